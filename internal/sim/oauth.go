package sim

import (
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// Environment variable names of the OAuth client credentials, as in the
// default catalog.
const (
	envSalesforceID     = "SALESFORCE_CLIENT_ID"
	envSalesforceSecret = "SALESFORCE_CLIENT_SECRET"
	envXeroID           = "XERO_CLIENT_ID"
	envXeroSecret       = "XERO_CLIENT_SECRET"
)

// pruneEvery is how many mints pass between sweeps of dead tokens.
const pruneEvery = 256

// oauthProvider is the token bookkeeping shared by the OAuth providers;
// flavor holds what differs (wire shapes, lifetimes, grace).
type oauthProvider struct {
	holder
	p      *Providers
	flavor oauthFlavor

	clientID     string
	clientSecret string

	mu       sync.Mutex
	families []*family
	access   map[string]*accessToken
	refresh  map[string]*refreshToken
	codes    map[string]*authCode
	mints    int
}

// oauthFlavor is what one OAuth provider does its own way.
type oauthFlavor struct {
	// ttl is the lifetime of access tokens from a refresh.
	ttl time.Duration
	// grace is how long a used refresh token stays usable (0: none).
	grace time.Duration
	// instanceURL: grants carry the server's URL as InstanceURL.
	instanceURL bool
	// newFamily fills in the account details of a new grant.
	newFamily func(f *family)
	// accessToken and refreshToken mint token strings.
	accessToken  func(f *family) string
	refreshToken func() string
	// tokenBody is the token endpoint's success answer.
	tokenBody func(f *family, access, refresh string, now time.Time, expiresIn time.Duration) any
	// clientError answers a failed client authentication.
	clientError func(w http.ResponseWriter, unknownID bool)
	// invalidGrant answers a dead refresh token.
	invalidGrant func(w http.ResponseWriter)
	// checkOK answers a check with a live access token.
	checkOK func(w http.ResponseWriter, f *family)
	// checkRejected answers a check with a dead or unknown access token.
	checkRejected func(w http.ResponseWriter, expired bool, at time.Time)
}

// family is one grant: the chain of tokens one authorization started.
type family struct {
	id       string
	account  string
	revokeAt time.Time // zero: never
	// Salesforce.
	orgID, userID string
	// Xero.
	tenant       Tenant
	connectionID string
	authEventID  string
	created      time.Time
	// scope granted on consent; "" means the flavor's usual scopes.
	scope string
}

func (f *family) revoked(now time.Time) bool {
	return !f.revokeAt.IsZero() && !now.Before(f.revokeAt)
}

type accessToken struct {
	fam       *family
	expiresAt time.Time
}

type refreshToken struct {
	fam    *family
	usedAt time.Time // zero: not used yet
}

func newOAuthProvider(p *Providers, f oauthFlavor) *oauthProvider {
	return &oauthProvider{
		p:            p,
		flavor:       f,
		clientID:     p.randString(24, alnum),
		clientSecret: p.randString(40, alnum),
		access:       map[string]*accessToken{},
		refresh:      map[string]*refreshToken{},
	}
}

// issue starts a new grant, as an authorization flow would.
func (o *oauthProvider) issue(opts issueOptions, now time.Time) OAuthGrant {
	f := &family{id: o.p.uuid(), account: opts.account, created: now}
	if f.account == "" {
		f.account = "org-" + o.p.randString(6, lowHex)
	}
	if opts.revoke {
		f.revokeAt = now.Add(opts.revokeAfter)
	}
	o.flavor.newFamily(f)
	ttl := o.flavor.ttl
	if opts.hasExpiry {
		ttl = opts.expiresIn
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.families = append(o.families, f)
	access, refresh, exp := o.mintLocked(f, now, ttl)
	g := OAuthGrant{AccessToken: access, RefreshToken: refresh, ExpiresAt: exp}
	if o.flavor.instanceURL {
		g.InstanceURL = o.srv.url
	}
	if f.tenant.ID != "" {
		g.Tenants = []Tenant{f.tenant}
	}
	return g
}

// mintLocked issues a new access and refresh token of f.
func (o *oauthProvider) mintLocked(f *family, now time.Time, ttl time.Duration) (access, refresh string, expiresAt time.Time) {
	o.mints++
	if o.mints%pruneEvery == 0 {
		o.pruneLocked(now)
	}
	access, refresh = o.flavor.accessToken(f), o.flavor.refreshToken()
	expiresAt = now.Add(ttl)
	o.access[access] = &accessToken{fam: f, expiresAt: expiresAt}
	o.refresh[refresh] = &refreshToken{fam: f}
	return access, refresh, expiresAt
}

// pruneLocked forgets tokens that can never be accepted again; an unknown
// token gets the same answer as a dead one.
func (o *oauthProvider) pruneLocked(now time.Time) {
	for k, a := range o.access {
		if !now.Before(a.expiresAt) {
			delete(o.access, k)
		}
	}
	for k, r := range o.refresh {
		if !r.usedAt.IsZero() && !now.Before(r.usedAt.Add(o.flavor.grace)) {
			delete(o.refresh, k)
		}
	}
}

// rotate exchanges a refresh token for new tokens. ok is false when the
// refresh token is unknown, revoked, or used (past the grace period).
func (o *oauthProvider) rotate(token string, now time.Time) (f *family, access, refresh string, ttl time.Duration, ok bool, revoked bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	rt, found := o.refresh[token]
	switch {
	case !found:
		return nil, "", "", 0, false, false
	case rt.fam.revoked(now):
		return rt.fam, "", "", 0, false, true
	case !rt.usedAt.IsZero() && !now.Before(rt.usedAt.Add(o.flavor.grace)):
		return rt.fam, "", "", 0, false, false
	}
	if rt.usedAt.IsZero() {
		rt.usedAt = now
	}
	access, refresh, _ = o.mintLocked(rt.fam, now, o.flavor.ttl)
	return rt.fam, access, refresh, o.flavor.ttl, true, false
}

// lookup returns the family of a live access token; expired says that the
// token is known but past its expiry.
func (o *oauthProvider) lookup(token string, now time.Time) (f *family, expired bool, at time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	a, ok := o.access[token]
	switch {
	case !ok:
		return nil, false, time.Time{}
	case !now.Before(a.expiresAt):
		return nil, true, a.expiresAt
	}
	return a.fam, false, time.Time{}
}

// revoke revokes the grant behind a refresh or access token, now.
func (o *oauthProvider) revoke(token string, now time.Time) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var f *family
	if rt, ok := o.refresh[token]; ok {
		f = rt.fam
	} else if a, ok := o.access[token]; ok {
		f = a.fam
	}
	if f == nil {
		return fmt.Errorf("%w: no such token", ErrUnknownCredential)
	}
	if f.revokeAt.IsZero() || f.revokeAt.After(now) {
		f.revokeAt = now
	}
	o.p.log.Info("simulated grant revoked", slog.String("provider", o.srv.id), slog.String("account", f.account))
	return nil
}

func (o *oauthProvider) revocations(now time.Time) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	var n int64
	for _, f := range o.families {
		if f.revoked(now) {
			n++
		}
	}
	return n
}

// token serves the token endpoint: grant_type=refresh_token with the
// client credentials as HTTP basic or as form parameters.
func (o *oauthProvider) token(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_request", Description: "malformed request body"})
		return
	}
	id, secret, basic := r.BasicAuth()
	if basic {
		// RFC 6749 2.3.1: both are form-encoded before basic encoding.
		id, _ = url.QueryUnescape(id)
		secret, _ = url.QueryUnescape(secret)
	} else {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	if !equal(id, o.clientID) {
		o.flavor.clientError(w, true)
		return
	}
	if !equal(secret, o.clientSecret) {
		o.flavor.clientError(w, false)
		return
	}
	if r.PostForm.Get("grant_type") == "authorization_code" {
		o.exchangeCode(w, r)
		return
	}
	if gt := r.PostForm.Get("grant_type"); gt != "refresh_token" {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "unsupported_grant_type", Description: "grant type not supported"})
		return
	}
	now := o.p.now()
	f, access, refresh, ttl, ok, revoked := o.rotate(r.PostForm.Get("refresh_token"), now)
	if !ok {
		o.srv.stats.invalidGrant()
		if revoked {
			o.p.log.Info("simulated refresh refused: grant revoked", slog.String("provider", o.srv.id), slog.String("account", f.account))
		}
		o.flavor.invalidGrant(w)
		return
	}
	o.srv.stats.rotated()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, o.flavor.tokenBody(f, access, refresh, now, ttl))
}

// check serves the check endpoint with a bearer token.
func (o *oauthProvider) check(w http.ResponseWriter, r *http.Request) {
	token, ok := bearer(r)
	if !ok {
		o.flavor.checkRejected(w, false, time.Time{})
		return
	}
	f, expired, at := o.lookup(token, o.p.now())
	if f == nil {
		o.flavor.checkRejected(w, expired, at)
		return
	}
	o.flavor.checkOK(w, f)
}

// oauthError is an RFC 6749 error answer.
type oauthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

// bearer returns the token of an "Authorization: Bearer ..." header.
func bearer(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", false
	}
	return strings.TrimSpace(token), true
}

func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
