// Package connect runs the OAuth connect flow of a connection: it sends the
// consumer to the provider's authorization endpoint with a single-use state
// (kept in Redis with a TTL, taken with GETDEL) bound to the consumer, the
// connection, the session and the browser that started it, with PKCE (S256)
// where the catalog says; its callback exchanges the code with
// golang.org/x/oauth2, stores the tokens through the state store (sealed as
// always), records the granted scopes, lets the notifier enqueue the first
// validation, and redirects to the session's redirect_uri with the outcome:
// ?status=connected|denied|error&reason=...
//
// No code, token or state value ever appears in a log line, a returned URL
// or an error.
package connect

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// Defaults of Config.
const (
	// DefaultStateTTL is how long a consumer has to finish authorizing.
	DefaultStateTTL = 10 * time.Minute
	// DefaultTimeout bounds a token exchange, revocation or choices call.
	DefaultTimeout = 15 * time.Second
	// CallbackPath is where the provider sends the consumer back.
	CallbackPath = "/vault/callback"
	// PagePath is the Vault page, always an allowed redirect target.
	PagePath = "/vault/page"
	// BindingCookie binds a state to the browser that started the flow.
	// It is SameSite=Lax (a Strict cookie is not sent on the provider's
	// cross-site redirect back) and scoped to CallbackPath.
	BindingCookie = "vf_connect"
)

// Outcome statuses on the redirect back.
const (
	StatusConnected = "connected"
	StatusDenied    = "denied"
	StatusError     = "error"
)

// Outcome reasons.
const (
	ReasonAccessDenied   = "access_denied"
	ReasonSessionExpired = "session_expired"
	ReasonTokenExchange  = "token_exchange_failed"
	ReasonMissingScopes  = "missing_scopes"
	ReasonStoreFailed    = "store_failed"
	ReasonProviderError  = "provider_error"
	ReasonForeignState   = "foreign_state"
)

// Errors of Start.
var (
	// ErrNotOAuth means the integration has no connect flow (not oauth2,
	// or no authorize_url in the catalog).
	ErrNotOAuth = errors.New("connect: the integration has no OAuth connect flow")
	// ErrNoClient means the OAuth client id is not configured.
	ErrNoClient = errors.New("connect: the OAuth client id is not configured")
	// ErrSessionExpired means the session ended before the flow started.
	ErrSessionExpired = errors.New("connect: session expired")
)

// Store is what the flow uses of *state.Store.
type Store interface {
	Get(ctx context.Context, ref state.Ref) (*state.Connection, error)
	Create(ctx context.Context, ref state.Ref, in state.Input) (state.Change, error)
	Patch(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error)
}

var _ Store = (*state.Store)(nil)

// Notifier enqueues what a write calls for (the first validation);
// scheduler.Notifier is the real one.
type Notifier interface {
	Notify(ctx context.Context, ch state.Change) error
}

// States keeps a flow's record between Start and Callback: put with a
// TTL, taken at most once; *state.FlowStates is one.
type States interface {
	Put(ctx context.Context, id string, value []byte, ttl time.Duration) error
	// Take returns the value and deletes it; ok false when there is none.
	Take(ctx context.Context, id string) (value []byte, ok bool, err error)
}

var _ States = (*state.FlowStates)(nil)

// Config configures a Flow. Store, Catalog, States, Notifier and
// PublicURL are required.
type Config struct {
	Store   Store
	Catalog *catalog.Catalog
	// States keeps the flows' states (state.NewFlowStates).
	States   States
	Notifier Notifier
	// Redirects is the allow-list of redirect URIs. If nil, none is
	// allowed: every flow that asks for a redirect fails.
	Redirects *Redirects
	// PublicURL is the fleet's external base URL (scheme and host); the
	// callback is PublicURL + CallbackPath and must be registered at the
	// provider.
	PublicURL string
	// Getenv reads the OAuth client credentials the catalog names. If nil,
	// os.Getenv.
	Getenv func(string) string
	// Transport for provider calls. If nil, http.DefaultTransport.
	Transport http.RoundTripper
	// StateTTL: if zero, DefaultStateTTL.
	StateTTL time.Duration
	// Timeout: if zero, DefaultTimeout.
	Timeout time.Duration
	// NowFunc: if nil, time.Now.
	NowFunc func() time.Time
	// Logger: if nil, discards.
	Logger *slog.Logger
}

// Flow runs connect flows.
type Flow struct {
	cfg      Config
	callback string
	pageURL  string
	secure   bool
}

// New validates cfg and returns a Flow.
func New(cfg Config) (*Flow, error) {
	switch {
	case cfg.Store == nil:
		return nil, errors.New("connect: Config.Store is required")
	case cfg.Catalog == nil:
		return nil, errors.New("connect: Config.Catalog is required")
	case cfg.States == nil:
		return nil, errors.New("connect: Config.States is required")
	case cfg.Notifier == nil:
		return nil, errors.New("connect: Config.Notifier is required")
	}
	u, err := url.Parse(cfg.PublicURL)
	if err != nil || !u.IsAbs() || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, errors.New("connect: Config.PublicURL must be an absolute http(s) URL")
	}
	if cfg.Getenv == nil {
		cfg.Getenv = os.Getenv
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport
	}
	if cfg.StateTTL <= 0 {
		cfg.StateTTL = DefaultStateTTL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	base := strings.TrimRight(u.Scheme+"://"+u.Host+u.Path, "/")
	return &Flow{cfg: cfg, callback: base + CallbackPath, pageURL: base + PagePath, secure: u.Scheme == "https"}, nil
}

// PageURL is the Vault page's URL.
func (f *Flow) PageURL() string { return f.pageURL }

// RedirectAllowed reports whether a session or flow may name uri as its
// redirect_uri: on the allow-list, or the Vault page itself.
func (f *Flow) RedirectAllowed(uri string) bool { return f.redirectAllowed(uri) }

// redirectAllowed: the allow-list, or the Vault page itself.
func (f *Flow) redirectAllowed(uri string) bool {
	if uri == f.pageURL || strings.HasPrefix(uri, f.pageURL+"?") {
		return true
	}
	return f.cfg.Redirects.Allowed(uri)
}

// CallbackURL is the redirect URI to register at each provider.
func (f *Flow) CallbackURL() string { return f.callback }

// Request starts a flow for one connection.
type Request struct {
	ConsumerID string
	UnifiedAPI string
	ServiceID  string
	// SessionID and SessionExpiry name the Vault session, if any; the
	// flow fails with session_expired when the session ends first.
	SessionID     string
	SessionExpiry time.Time
	// RedirectURI is where the consumer goes back with the outcome; it
	// must be on the allow-list. Empty: the callback answers a small page.
	RedirectURI string
	// Bind ties the state to the browser with a cookie (the Vault page).
	// Flows started by an operator token for another client leave it off.
	Bind bool
}

// Started is a started flow.
type Started struct {
	// URL is the provider's authorization URL to send the browser to.
	URL string
	// binding is the cookie value that must come back, if bound.
	binding string
}

// record is what a state key holds.
type record struct {
	ConsumerID    string    `json:"c"`
	ConnectionID  string    `json:"n"`
	SessionID     string    `json:"s,omitempty"`
	SessionExpiry time.Time `json:"se,omitzero"`
	RedirectURI   string    `json:"r,omitempty"`
	Verifier      string    `json:"v,omitempty"`
	// Binding is the SHA-256 of the binding cookie, base64url.
	Binding string `json:"b,omitempty"`
}

// integration returns the oauth2 integration with a connect flow.
func (f *Flow) integration(unifiedAPI, serviceID string) (*catalog.Integration, error) {
	in, ok := f.cfg.Catalog.Get(serviceID)
	if !ok || in.UnifiedAPI != unifiedAPI || in.AuthType != catalog.AuthOAuth2 || in.OAuth == nil || in.OAuth.AuthorizeURL == "" {
		return nil, ErrNotOAuth
	}
	return in, nil
}

// Supported reports whether the integration has a connect flow.
func (f *Flow) Supported(unifiedAPI, serviceID string) bool {
	_, err := f.integration(unifiedAPI, serviceID)
	return err == nil
}

func (f *Flow) oauthConfig(in *catalog.Integration, settings map[string]string) (*oauth2.Config, error) {
	id, secret := f.cfg.Getenv(in.OAuth.ClientIDEnv), f.cfg.Getenv(in.OAuth.ClientSecretEnv)
	if in.OAuth.ClientIDEnv == "" || id == "" {
		return nil, fmt.Errorf("%w ($%s is empty)", ErrNoClient, in.OAuth.ClientIDEnv)
	}
	authURL, _, err := in.AuthorizeURL(settings)
	if err != nil {
		return nil, err
	}
	tokenURL, err := in.TokenURL(settings)
	if err != nil {
		return nil, err
	}
	style := oauth2.AuthStyleInHeader
	if in.OAuth.AuthStyle == catalog.AuthStyleParams {
		style = oauth2.AuthStyleInParams
	}
	return &oauth2.Config{ClientID: id, ClientSecret: secret, RedirectURL: f.callback, Scopes: in.OAuth.Scopes,
		Endpoint: oauth2.Endpoint{AuthURL: authURL.String(), TokenURL: tokenURL.String(), AuthStyle: style}}, nil
}

func randomToken() string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// Start checks the request and returns the authorization URL. Settings the
// authorize URL needs (Workday's host) come from the stored connection.
func (f *Flow) Start(ctx context.Context, req Request) (*Started, error) {
	in, err := f.integration(req.UnifiedAPI, req.ServiceID)
	if err != nil {
		return nil, err
	}
	now := f.cfg.NowFunc()
	if req.SessionID != "" && !req.SessionExpiry.After(now) {
		return nil, ErrSessionExpired
	}
	if req.RedirectURI != "" && !f.redirectAllowed(req.RedirectURI) {
		return nil, ErrRedirectNotAllowed
	}
	ref := state.Ref{ConsumerID: req.ConsumerID, ConnectionID: state.ConnectionID(req.UnifiedAPI, req.ServiceID)}
	var settings map[string]string
	switch c, err := f.cfg.Store.Get(ctx, ref); {
	case err == nil:
		settings = c.Settings
	case !errors.Is(err, state.ErrNotFound):
		return nil, err
	}
	conf, err := f.oauthConfig(in, settings)
	if err != nil {
		return nil, err
	}
	st := randomToken()
	rec := record{ConsumerID: ref.ConsumerID, ConnectionID: ref.ConnectionID, SessionID: req.SessionID,
		SessionExpiry: req.SessionExpiry, RedirectURI: req.RedirectURI}
	opts := []oauth2.AuthCodeOption{}
	for k, v := range in.OAuth.AuthorizeParams {
		opts = append(opts, oauth2.SetAuthURLParam(k, v))
	}
	if in.OAuth.PKCE {
		rec.Verifier = oauth2.GenerateVerifier()
		opts = append(opts, oauth2.S256ChallengeOption(rec.Verifier))
	}
	out := &Started{}
	if req.Bind {
		out.binding = randomToken()
		rec.Binding = digest(out.binding)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	// Kept under the state's digest, so a Redis dump does not hand out
	// live states.
	if err := f.cfg.States.Put(ctx, digest(st), b, f.cfg.StateTTL); err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	out.URL = conf.AuthCodeURL(st, opts...)
	f.cfg.Logger.InfoContext(ctx, "connect: flow started", slog.String("consumer_id", ref.ConsumerID),
		slog.String("connection_id", ref.ConnectionID), slog.Bool("pkce", in.OAuth.PKCE))
	return out, nil
}

// Redirect sends the browser to the provider, setting the binding cookie
// of a bound flow.
func (f *Flow) Redirect(w http.ResponseWriter, r *http.Request, s *Started) {
	if s.binding != "" {
		http.SetCookie(w, &http.Cookie{Name: BindingCookie, Value: s.binding, Path: CallbackPath,
			MaxAge: int(f.cfg.StateTTL / time.Second), HttpOnly: true, Secure: f.secure, SameSite: http.SameSiteLaxMode})
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Referrer-Policy", "no-referrer")
	http.Redirect(w, r, s.URL, http.StatusFound)
}

var reasonRE = regexp.MustCompile(`^[a-z_]{1,64}$`)

// Callback serves CallbackPath.
func (f *Flow) Callback(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Referrer-Policy", "no-referrer")
	q := r.URL.Query()
	st := q.Get("state")
	var rec record
	if st != "" {
		b, ok, err := f.cfg.States.Take(ctx, digest(st))
		switch {
		case err != nil:
			f.cfg.Logger.ErrorContext(ctx, "connect: read state", slog.String("error", err.Error()))
			f.page(w, http.StatusServiceUnavailable, "The sign-in could not be completed right now. Please try again.")
			return
		case !ok:
			st = ""
		default:
			if json.Unmarshal(b, &rec) != nil {
				st = ""
			}
		}
	}
	if st == "" {
		f.cfg.Logger.WarnContext(ctx, "connect: unknown, used or expired state")
		f.page(w, http.StatusBadRequest, "This sign-in link was already used or has expired. Start again from the Vault page.")
		return
	}
	http.SetCookie(w, &http.Cookie{Name: BindingCookie, Value: "", Path: CallbackPath, MaxAge: -1, HttpOnly: true,
		Secure: f.secure, SameSite: http.SameSiteLaxMode})
	log := f.cfg.Logger.With(slog.String("consumer_id", rec.ConsumerID), slog.String("connection_id", rec.ConnectionID))
	finish := func(status, reason string) {
		log.InfoContext(ctx, "connect: flow finished", slog.String("status", status), slog.String("reason", reason))
		if rec.RedirectURI == "" || !f.redirectAllowed(rec.RedirectURI) {
			msg := "The account is connected. You can close this window."
			if status != StatusConnected {
				msg = "The account was not connected (" + status + ": " + reason + ")."
			}
			f.page(w, http.StatusOK, msg)
			return
		}
		http.Redirect(w, r, WithOutcome(rec.RedirectURI, status, reason, rec.ConnectionID), http.StatusFound)
	}
	if rec.Binding != "" {
		c, err := r.Cookie(BindingCookie)
		if err != nil || subtle.ConstantTimeCompare([]byte(digest(c.Value)), []byte(rec.Binding)) != 1 {
			// Another browser came back with this state (a link passed on,
			// or login CSRF): nothing is stored.
			log.WarnContext(ctx, "connect: state returned by another browser")
			f.page(w, http.StatusForbidden, "This sign-in was started in another browser. Start again from the Vault page.")
			return
		}
	}
	if rec.SessionID != "" && !rec.SessionExpiry.After(f.cfg.NowFunc()) {
		finish(StatusError, ReasonSessionExpired)
		return
	}
	if e := q.Get("error"); e != "" {
		if e == "access_denied" {
			finish(StatusDenied, ReasonAccessDenied)
			return
		}
		reason := ReasonProviderError
		if reasonRE.MatchString(e) {
			reason = e
		}
		finish(StatusError, reason)
		return
	}
	code := q.Get("code")
	if code == "" {
		finish(StatusError, ReasonProviderError)
		return
	}
	status, reason := f.complete(ctx, log, rec, code)
	finish(status, reason)
}

// complete exchanges the code and stores the tokens.
func (f *Flow) complete(ctx context.Context, log *slog.Logger, rec record, code string) (status, reason string) {
	api, svc, _ := state.SplitConnectionID(rec.ConnectionID)
	in, err := f.integration(api, svc)
	if err != nil {
		return StatusError, ReasonProviderError
	}
	ref := state.Ref{ConsumerID: rec.ConsumerID, ConnectionID: rec.ConnectionID}
	cur, err := f.cfg.Store.Get(ctx, ref)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		log.ErrorContext(ctx, "connect: read connection", slog.String("error", err.Error()))
		return StatusError, ReasonStoreFailed
	}
	var settings map[string]string
	if cur != nil {
		settings = cur.Settings
	}
	conf, err := f.oauthConfig(in, settings)
	if err != nil {
		log.ErrorContext(ctx, "connect: oauth config", slog.String("error", err.Error()))
		return StatusError, ReasonTokenExchange
	}
	ectx, cancel := context.WithTimeout(ctx, f.cfg.Timeout)
	defer cancel()
	ectx = context.WithValue(ectx, oauth2.HTTPClient, &http.Client{Transport: f.cfg.Transport, CheckRedirect: in.CheckRedirect})
	var opts []oauth2.AuthCodeOption
	if rec.Verifier != "" {
		opts = append(opts, oauth2.VerifierOption(rec.Verifier))
	}
	tok, err := conf.Exchange(ectx, code, opts...)
	if err != nil {
		// Never err.Error(): a RetrieveError carries the response body.
		attrs := []any{slog.String("error_type", fmt.Sprintf("%T", err))}
		var re *oauth2.RetrieveError
		if errors.As(err, &re) {
			attrs = append(attrs, slog.String("oauth_error", re.ErrorCode))
			if re.Response != nil {
				attrs = append(attrs, slog.Int("http_status", re.Response.StatusCode))
			}
		}
		log.WarnContext(ctx, "connect: token exchange failed", attrs...)
		return StatusError, ReasonTokenExchange
	}
	granted := in.OAuth.Scopes
	if s, ok := tok.Extra("scope").(string); ok {
		// RFC 6749 5.1: scope is space-delimited; some providers use commas.
		granted = strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' })
	}
	if granted == nil {
		granted = []string{}
	}
	creds := map[string]string{catalog.FieldAccessToken: tok.AccessToken, catalog.FieldRefreshToken: tok.RefreshToken,
		catalog.FieldExpiresAt: ""}
	if !tok.Expiry.IsZero() {
		creds[catalog.FieldExpiresAt] = tok.Expiry.UTC().Format(time.RFC3339)
	}
	input := state.Input{Credentials: creds, GrantedScopes: granted}
	for _, s := range in.Settings {
		if s.FromToken == "" {
			continue
		}
		if v, ok := tok.Extra(s.FromToken).(string); ok && v != "" {
			if input.Settings == nil {
				input.Settings = map[string]string{}
			}
			input.Settings[s.Name] = v
		}
	}
	var ch state.Change
	if cur == nil {
		ch, err = f.cfg.Store.Create(ctx, ref, input)
		if errors.Is(err, state.ErrExists) {
			ch, err = f.cfg.Store.Patch(ctx, ref, input, 0)
		}
	} else {
		ch, err = f.cfg.Store.Patch(ctx, ref, input, 0)
	}
	if err != nil {
		log.ErrorContext(ctx, "connect: store tokens", slog.String("error", err.Error()))
		return StatusError, ReasonStoreFailed
	}
	if err := f.cfg.Notifier.Notify(context.WithoutCancel(ctx), ch); err != nil {
		// The store's due index catches a lost enqueue.
		log.WarnContext(ctx, "connect: notify", slog.String("error", err.Error()))
	}
	if missing := in.MissingScopes(granted); len(missing) > 0 {
		log.InfoContext(ctx, "connect: required scopes not granted", slog.Any("missing", missing))
		return StatusError, ReasonMissingScopes
	}
	return StatusConnected, ""
}

var messagePage = template.Must(template.New("m").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vaultfleet</title></head>
<body><p id="message">{{.}}</p></body></html>
`))

func (f *Flow) page(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
	w.Header().Set("X-Frame-Options", "DENY")
	w.WriteHeader(status)
	_ = messagePage.Execute(w, msg)
}
