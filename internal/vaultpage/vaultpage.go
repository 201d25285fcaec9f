// Package vaultpage serves the Vault page: the page a consumer opens from
// a session's session_uri to see its integrations with their state and
// health and to take the actions the session allows (connect or
// reauthorize over OAuth, credentials, settings, enable/disable,
// disconnect, delete). It is server-rendered (html/template) with one small
// script file that follows state changes over server-sent events.
//
// Every action is checked on the server against the session's
// allow_actions. The page is protected against CSRF (a token bound to the
// session, double-submitted as a cookie and a form field, plus
// http.CrossOriginProtection's Origin/Sec-Fetch-Site checks) and framing
// (X-Frame-Options DENY, frame-ancestors 'none'), and sets a strict
// Content-Security-Policy without inline script.
package vaultpage

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/state"
)

// Paths.
const (
	// SessionPath exchanges ?token= for the session cookie.
	SessionPath = "/vault/session"
	// PagePath is the page; its assets, events and actions live below it.
	PagePath = connect.PagePath
	// SessionCookie holds the session token (HttpOnly, SameSite=Strict).
	SessionCookie = "vf_session"
	// CSRFCookie holds the double-submitted CSRF token.
	CSRFCookie = "vf_csrf"
)

// streamWriteTimeout bounds each write of an event stream.
const streamWriteTimeout = 30 * time.Second

// streamIDRE matches a Redis stream entry id.
var streamIDRE = regexp.MustCompile(`^[0-9]{1,20}-[0-9]{1,20}$`)

// DefaultPollInterval is how often the event stream is read for the
// page's server-sent events.
const DefaultPollInterval = 500 * time.Millisecond

//go:embed page.html.tmpl
var pageSrc string

//go:embed static
var static embed.FS

var pageTmpl = template.Must(template.New("page").Parse(pageSrc))

// Store is what the page uses of *state.Store.
type Store interface {
	Get(ctx context.Context, ref state.Ref) (*state.Connection, error)
	ListConsumer(ctx context.Context, consumerID string) ([]*state.Connection, error)
	Create(ctx context.Context, ref state.Ref, in state.Input) (state.Change, error)
	Patch(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error)
	Delete(ctx context.Context, ref state.Ref, ifVersion int64) (state.Change, error)
	ReadEvents(ctx context.Context, afterID string, count int64) ([]state.Event, error)
	LatestEvents(ctx context.Context, n int64) ([]state.Event, error)
}

var _ Store = (*state.Store)(nil)

// Notifier enqueues what a write calls for; scheduler.Notifier is the
// real one.
type Notifier interface {
	Notify(ctx context.Context, ch state.Change) error
}

// Config configures the page. Every field but the optional ones is
// required.
type Config struct {
	Store    Store
	Catalog  *catalog.Catalog
	Sessions *session.Keys
	Flow     *connect.Flow
	Notifier Notifier
	// Secure marks cookies Secure (serve behind https).
	Secure bool
	// Done ends the event streams (server shutdown). Optional.
	Done <-chan struct{}
	// PollInterval: if zero, DefaultPollInterval.
	PollInterval time.Duration
	// NowFunc: if nil, time.Now.
	NowFunc func() time.Time
	// Logger: if nil, discards.
	Logger *slog.Logger
}

type handler struct {
	cfg Config
	log *slog.Logger
}

// New returns the handler of SessionPath and PagePath (and below). Mount
// it at both.
func New(cfg Config) (http.Handler, error) {
	switch {
	case cfg.Store == nil, cfg.Catalog == nil, cfg.Sessions == nil, cfg.Flow == nil, cfg.Notifier == nil:
		return nil, errors.New("vaultpage: Store, Catalog, Sessions, Flow and Notifier are required")
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	h := &handler{cfg: cfg, log: cfg.Logger}
	sub, err := fs.Sub(static, "static")
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+SessionPath, h.open)
	mux.HandleFunc("GET "+PagePath, h.page)
	mux.Handle("GET "+PagePath+"/static/", http.StripPrefix(PagePath+"/static/", http.FileServerFS(sub)))
	mux.HandleFunc("GET "+PagePath+"/events", h.events)
	mux.HandleFunc("POST "+PagePath+"/connections/{unified_api}/{service_id}/{action}", h.act)
	mux.HandleFunc(connect.CallbackPath, cfg.Flow.Callback)
	cop := http.NewCrossOriginProtection()
	return secureHeaders(cop.Handler(mux)), nil
}

// secureHeaders: no framing, a strict CSP (the page adds form-action for
// the providers), no caching of pages that show a consumer's data.
func secureHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		h.Set("Content-Security-Policy", csp(nil))
		next.ServeHTTP(w, r)
	})
}

// csp is the page's policy; formTargets are the origins a form may be
// redirected to (the providers' authorization endpoints).
func csp(formTargets []string) string {
	return "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
		"base-uri 'none'; frame-ancestors 'none'; form-action 'self'" + strings.Join(append([]string{""}, formTargets...), " ")
}

// claims reads the session cookie.
func (h *handler) claims(r *http.Request) (*session.Claims, string, error) {
	c, err := r.Cookie(SessionCookie)
	if err != nil {
		return nil, "", session.ErrInvalid
	}
	cl, err := h.cfg.Sessions.Verify(c.Value, h.cfg.NowFunc())
	return cl, c.Value, err
}

func (h *handler) message(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_ = template.Must(template.New("m").Parse(`<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Integrations</title></head><body><p id="message">{{.}}</p></body></html>`)).Execute(w, msg)
}

func (h *handler) sessionProblem(w http.ResponseWriter, err error) {
	if errors.Is(err, session.ErrExpired) {
		h.message(w, http.StatusUnauthorized, "This session has expired. Open the integrations page again from the application.")
		return
	}
	h.message(w, http.StatusUnauthorized, "This link is not a valid session. Open the integrations page again from the application.")
}

// open exchanges ?token= for the cookie and redirects to strip the token
// from the address bar and history.
func (h *handler) open(w http.ResponseWriter, r *http.Request) {
	tok := r.URL.Query().Get("token")
	cl, err := h.cfg.Sessions.Verify(tok, h.cfg.NowFunc())
	if err != nil {
		h.sessionProblem(w, err)
		return
	}
	maxAge := int(cl.ExpiresAt.Sub(h.cfg.NowFunc()) / time.Second)
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: tok, Path: "/vault", MaxAge: max(maxAge, 1),
		HttpOnly: true, Secure: h.cfg.Secure, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, PagePath, http.StatusSeeOther)
}

// view types of the template.

type pageView struct {
	Base, CSRF, ConsumerID, Expires, ReturnURL string
	// EventsAfter is the event stream's position just before the page read
	// the connections: the page's event stream starts there, so a change
	// made between the render and the stream's start is not missed.
	EventsAfter string
	Notice      *notice
	Items       []itemView
}

type notice struct {
	OK   bool
	Text string
}

type itemView struct {
	ServiceID, UnifiedAPI, ConnectionID, Name, AuthType, Status string
	State                                                       state.State
	Health                                                      state.Health
	Beta, OAuth, Exists, Disabled, HasCredentials               bool
	CanAuthorize, CanDisable, CanDisconnect, CanDelete          bool
	CredentialFields                                            []fieldView
	Settings                                                    []settingView
}

type fieldView struct {
	ID, Name    string
	Secret, Set bool
}

type settingView struct {
	ID, Name, Value string
	Required        bool
	Choices         []connect.Choice
}

func noticeFor(q url.Values) *notice {
	switch q.Get("status") {
	case connect.StatusConnected:
		return &notice{OK: true, Text: "Connected."}
	case connect.StatusDenied:
		return &notice{Text: "Access was denied at the provider: nothing was connected."}
	case connect.StatusError:
		return &notice{Text: "The connection did not complete: " + strings.ReplaceAll(q.Get("reason"), "_", " ") + "."}
	case "saved":
		return &notice{OK: true, Text: "Saved."}
	case "refused":
		return &notice{Text: q.Get("reason")}
	}
	return nil
}

func (h *handler) page(w http.ResponseWriter, r *http.Request) {
	cl, _, err := h.claims(r)
	if err != nil {
		h.sessionProblem(w, err)
		return
	}
	ctx := r.Context()
	// The stream's position first, then the connections: any change the
	// page does not show has an event after that position.
	after := ""
	if last, err := h.cfg.Store.LatestEvents(ctx, 1); err == nil {
		after = "0-0"
		if len(last) == 1 {
			after = last[0].ID
		}
	}
	conns, err := h.cfg.Store.ListConsumer(ctx, cl.ConsumerID())
	if err != nil {
		h.log.ErrorContext(ctx, "vaultpage: list connections", slog.String("error", err.Error()))
		h.message(w, http.StatusServiceUnavailable, "The integrations cannot be shown right now.")
		return
	}
	byID := map[string]*state.Connection{}
	for _, c := range conns {
		byID[c.ID] = c
	}
	csrf := h.cfg.Sessions.MAC("csrf", cl.SessionID())
	v := pageView{Base: PagePath, CSRF: csrf, ConsumerID: cl.ConsumerID(), EventsAfter: after,
		Expires: cl.ExpiresAt.UTC().Format("2006-01-02 15:04 UTC"), Notice: noticeFor(r.URL.Query())}
	if cl.RedirectURI != "" && h.redirectOK(cl.RedirectURI) {
		v.ReturnURL = cl.RedirectURI
	}
	var targets []string
	for _, in := range h.cfg.Catalog.Integrations {
		if !cl.AllowsAPI(in.UnifiedAPI) {
			continue
		}
		c := byID[state.ConnectionID(in.UnifiedAPI, in.ID)]
		it := h.item(ctx, cl, in, c)
		v.Items = append(v.Items, it)
		if it.OAuth {
			var settings map[string]string
			if c != nil {
				settings = c.Settings
			}
			if u, ok, err := in.AuthorizeURL(settings); ok && err == nil && !slices.Contains(targets, u.Scheme+"://"+u.Host) {
				targets = append(targets, u.Scheme+"://"+u.Host)
			}
		}
	}
	http.SetCookie(w, &http.Cookie{Name: CSRFCookie, Value: csrf, Path: PagePath, HttpOnly: true,
		Secure: h.cfg.Secure, SameSite: http.SameSiteStrictMode})
	w.Header().Set("Content-Security-Policy", csp(targets))
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := pageTmpl.Execute(w, v); err != nil {
		h.log.ErrorContext(ctx, "vaultpage: render", slog.String("error", err.Error()))
	}
}

func (h *handler) redirectOK(uri string) bool {
	u, err := url.Parse(uri)
	return err == nil && (u.Scheme == "https" || u.Scheme == "http") && u.Host != ""
}

func (h *handler) item(ctx context.Context, cl *session.Claims, in *catalog.Integration, c *state.Connection) itemView {
	it := itemView{ServiceID: in.ID, UnifiedAPI: in.UnifiedAPI, ConnectionID: state.ConnectionID(in.UnifiedAPI, in.ID),
		Name: in.Name, AuthType: string(in.AuthType), Status: string(in.Status), Beta: in.Status != catalog.StatusLive,
		OAuth: h.cfg.Flow.Supported(in.UnifiedAPI, in.ID), State: state.Available, Health: state.HealthOK}
	if c != nil {
		it.Exists, it.State, it.Health, it.Disabled = true, c.State, c.Health, !c.Enabled
		it.HasCredentials = len(c.Credentials.Fields()) > 0
	}
	it.CanAuthorize = !it.HasCredentials || cl.Allows(session.ActionReauthorize)
	it.CanDisable = cl.Allows(session.ActionDisable)
	it.CanDisconnect = cl.Allows(session.ActionDisconnect)
	it.CanDelete = cl.Allows(session.ActionDelete)
	for _, f := range in.CredentialFields {
		set := c != nil && c.Credentials.Get(f) != ""
		it.CredentialFields = append(it.CredentialFields, fieldView{ID: "cred-" + in.ID + "-" + f, Name: f,
			Secret: f != catalog.FieldUsername, Set: set})
	}
	for _, s := range in.Settings {
		// Settings that come from the token endpoint are not the consumer's to type.
		if s.FromToken != "" {
			continue
		}
		sv := settingView{ID: in.ID + "-" + s.Name, Name: s.Name, Required: s.Required}
		if c != nil {
			sv.Value = c.Settings[s.Name]
		}
		if s.Choices != nil {
			if c == nil || c.Credentials.AccessToken == "" {
				continue // listed once authorized
			}
			ch, err := h.cfg.Flow.Choices(ctx, c, s.Name)
			if err != nil {
				h.log.WarnContext(ctx, "vaultpage: list choices", slog.String("connection_id", c.ID), slog.String("error", err.Error()))
			}
			sv.Choices = ch
			if len(ch) == 0 {
				continue
			}
		}
		it.Settings = append(it.Settings, sv)
	}
	return it
}

// back redirects to the page with an outcome.
func back(w http.ResponseWriter, r *http.Request, status, reason string) {
	q := url.Values{"status": {status}}
	if reason != "" {
		q.Set("reason", reason)
	}
	http.Redirect(w, r, PagePath+"?"+q.Encode(), http.StatusSeeOther)
}

// act serves the page's forms.
func (h *handler) act(w http.ResponseWriter, r *http.Request) {
	cl, _, err := h.claims(r)
	if err != nil {
		h.sessionProblem(w, err)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		h.message(w, http.StatusBadRequest, "The form could not be read.")
		return
	}
	ck, err := r.Cookie(CSRFCookie)
	form := r.PostForm.Get("csrf")
	if err != nil || form == "" || ck.Value != form || !h.cfg.Sessions.VerifyMAC("csrf", cl.SessionID(), form) {
		h.message(w, http.StatusForbidden, "The form has expired. Reload the page and try again.")
		return
	}
	api, svc, action := r.PathValue("unified_api"), r.PathValue("service_id"), r.PathValue("action")
	in, ok := h.cfg.Catalog.Get(svc)
	if !ok || in.UnifiedAPI != api || !cl.AllowsAPI(api) {
		h.message(w, http.StatusNotFound, "No such integration.")
		return
	}
	ctx := r.Context()
	ref := state.Ref{ConsumerID: cl.ConsumerID(), ConnectionID: state.ConnectionID(api, svc)}
	cur, err := h.cfg.Store.Get(ctx, ref)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		h.message(w, http.StatusServiceUnavailable, "The connection cannot be read right now.")
		return
	}
	hasCreds := cur != nil && len(cur.Credentials.Fields()) > 0
	refuse := func(a session.Action) bool {
		if err := cl.Require(a); err != nil {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.WriteHeader(http.StatusForbidden)
			_, _ = io.WriteString(w, "action "+string(a)+" is not allowed by this session\n")
			return true
		}
		return false
	}
	var ch state.Change
	switch action {
	case "connect":
		if hasCreds && refuse(session.ActionReauthorize) {
			return
		}
		redirect := h.cfg.Flow.PageURL()
		if cl.RedirectURI != "" {
			redirect = cl.RedirectURI
		}
		s, err := h.cfg.Flow.Start(ctx, connect.Request{ConsumerID: cl.ConsumerID(), UnifiedAPI: api, ServiceID: svc,
			SessionID: cl.SessionID(), SessionExpiry: cl.ExpiresAt.Time, RedirectURI: redirect, Bind: true})
		if err != nil {
			h.log.WarnContext(ctx, "vaultpage: connect", slog.String("connection_id", ref.ConnectionID), slog.String("error", err.Error()))
			back(w, r, connect.StatusError, "could not start: "+publicReason(err))
			return
		}
		h.cfg.Flow.Redirect(w, r, s)
		return
	case "credentials":
		if hasCreds && refuse(session.ActionReauthorize) {
			return
		}
		creds := map[string]string{}
		for _, f := range in.CredentialFields {
			if v := r.PostForm.Get("cred_" + f); v != "" {
				creds[f] = v
			}
		}
		if len(creds) == 0 {
			back(w, r, "refused", "Enter the credentials first.")
			return
		}
		ch, err = h.write(ctx, ref, cur, state.Input{Credentials: creds})
	case "settings":
		settings := map[string]string{}
		for _, s := range in.Settings {
			if vals, ok := r.PostForm["set_"+s.Name]; ok && s.FromToken == "" {
				settings[s.Name] = strings.TrimSpace(vals[0])
			}
			// A value picked from the provider's list must be on it.
			if v := settings[s.Name]; s.Choices != nil && v != "" && cur != nil {
				choices, err := h.cfg.Flow.Choices(ctx, cur, s.Name)
				if err != nil || !slices.ContainsFunc(choices, func(c connect.Choice) bool { return c.Value == v }) {
					back(w, r, "refused", "Not saved: "+s.Name+" is not one of the choices the provider lists.")
					return
				}
			}
		}
		ch, err = h.write(ctx, ref, cur, state.Input{Settings: settings})
	case "enable", "disable":
		if cur == nil {
			h.message(w, http.StatusNotFound, "No such connection.")
			return
		}
		enabled := action == "enable"
		if !enabled && refuse(session.ActionDisable) {
			return
		}
		ch, err = h.cfg.Store.Patch(ctx, ref, state.Input{Enabled: &enabled}, 0)
	case "disconnect":
		if refuse(session.ActionDisconnect) {
			return
		}
		if cur == nil {
			h.message(w, http.StatusNotFound, "No such connection.")
			return
		}
		if _, rerr := h.cfg.Flow.Revoke(ctx, cur); rerr != nil {
			h.log.WarnContext(ctx, "vaultpage: revoke", slog.String("connection_id", cur.ID), slog.String("error", rerr.Error()))
		}
		clear := map[string]string{}
		for _, f := range cur.Credentials.Fields() {
			clear[f] = ""
		}
		ch, err = h.cfg.Store.Patch(ctx, ref, state.Input{Credentials: clear}, 0)
	case "delete":
		if refuse(session.ActionDelete) {
			return
		}
		ch, err = h.cfg.Store.Delete(ctx, ref, 0)
	default:
		h.message(w, http.StatusNotFound, "No such action.")
		return
	}
	if err != nil {
		h.log.InfoContext(ctx, "vaultpage: write refused", slog.String("connection_id", ref.ConnectionID),
			slog.String("action", action), slog.String("error", err.Error()))
		back(w, r, "refused", "Not saved: "+publicReason(err))
		return
	}
	if nerr := h.cfg.Notifier.Notify(context.WithoutCancel(ctx), ch); nerr != nil {
		h.log.WarnContext(ctx, "vaultpage: notify", slog.String("error", nerr.Error()))
	}
	back(w, r, "saved", "")
}

// write creates or patches.
func (h *handler) write(ctx context.Context, ref state.Ref, cur *state.Connection, in state.Input) (state.Change, error) {
	if cur == nil {
		return h.cfg.Store.Create(ctx, ref, in)
	}
	return h.cfg.Store.Patch(ctx, ref, in, 0)
}

// publicReason is an error's text safe to show: store validation errors
// name fields, never values.
func publicReason(err error) string {
	var fe *state.FieldError
	switch {
	case errors.As(err, &fe):
		return fe.Field + ": " + fe.Msg
	case errors.Is(err, connect.ErrNoClient):
		return "the integration's OAuth client is not configured"
	case errors.Is(err, connect.ErrSessionExpired):
		return "the session expired"
	case errors.Is(err, connect.ErrRedirectNotAllowed):
		return "the redirect URI is not allowed"
	case errors.Is(err, catalog.ErrMissingSetting):
		return "a setting is needed first"
	case errors.Is(err, catalog.ErrInvalidSetting), errors.Is(err, catalog.ErrHostNotAllowed):
		return "a setting is not valid"
	}
	return "please try again"
}

// eventView is what the page's script receives.
type eventView struct {
	id           string
	ConnectionID string       `json:"connection_id"`
	State        state.State  `json:"state,omitempty"`
	Health       state.Health `json:"health,omitempty"`
}

// events streams the consumer's state changes as server-sent events,
// until the client goes, the session ends, or the server stops.
func (h *handler) events(w http.ResponseWriter, r *http.Request) {
	cl, _, err := h.claims(r)
	if err != nil {
		http.Error(w, "session expired", http.StatusUnauthorized)
		return
	}
	ctx := r.Context()
	// A reconnecting EventSource says where it stopped; a first connection
	// starts where the page was rendered (?after=); otherwise at the
	// stream's end.
	after := r.Header.Get("Last-Event-ID")
	if !streamIDRE.MatchString(after) {
		after = r.URL.Query().Get("after")
	}
	if !streamIDRE.MatchString(after) {
		after = "0-0"
		if last, err := h.cfg.Store.LatestEvents(ctx, 1); err == nil && len(last) == 1 {
			after = last[0].ID
		}
	}
	rc := http.NewResponseController(w)
	// The server's read and write timeouts are for ordinary requests: a
	// stream lives on (a read deadline would even cancel its context), and
	// each write gets its own deadline instead.
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Accel-Buffering", "no")
	_, _ = io.WriteString(w, "retry: 2000\n\n")
	if rc.Flush() != nil {
		return
	}
	tick := time.NewTicker(h.cfg.PollInterval)
	defer tick.Stop()
	end := time.NewTimer(time.Until(cl.ExpiresAt.Time))
	defer end.Stop()
	idle := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.cfg.Done:
			return
		case <-end.C:
			return
		case <-tick.C:
		}
		evs, err := h.cfg.Store.ReadEvents(ctx, after, 500)
		if err != nil {
			h.log.WarnContext(ctx, "vaultpage: read events", slog.String("error", err.Error()))
			continue
		}
		var out []eventView
		for _, e := range evs {
			after = e.ID
			if e.ConsumerID != cl.ConsumerID() || !cl.AllowsAPI(e.UnifiedAPI) {
				continue
			}
			ev := eventView{id: e.ID, ConnectionID: e.ConnectionID, State: e.StateAfter, Health: e.HealthAfter}
			if e.Type == state.EventDeleted {
				ev.State = state.Available
			}
			out = append(out, ev)
		}
		if len(out) == 0 {
			if idle++; idle*int(h.cfg.PollInterval) < int(15*time.Second) {
				continue
			}
			idle = 0
		}
		_ = rc.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
		if len(out) == 0 {
			_, err = io.WriteString(w, ": keep-alive\n\n")
		}
		for _, ev := range out {
			b, _ := json.Marshal(ev)
			if _, err = io.WriteString(w, "id: "+ev.id+"\nevent: state\ndata: "+string(b)+"\n\n"); err != nil {
				return
			}
		}
		if err != nil || rc.Flush() != nil {
			return
		}
	}
}
