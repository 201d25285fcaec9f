package connect_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/internal/simtest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) { redistest.Main(m) }

const appURL = "https://app.example.com/settings/integrations"

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// lockedBuffer is a log sink the test reads while handlers write.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

type bench struct {
	p     *sim.Providers
	rdb   *redis.Client
	store *state.Store
	flow  *connect.Flow
	srv   *httptest.Server
	clock *clock
	logs  *lockedBuffer
	env   map[string]string
	insp  *asynq.Inspector
	// req is the next flow /start begins.
	req connect.Request
}

func setup(t *testing.T) *bench {
	t.Helper()
	se := simtest.Start(t)
	p, cat, rdb, store := se.Providers, se.Catalog, se.Redis, se.Store
	b := &bench{p: p, rdb: rdb, store: store, clock: &clock{now: time.Now()}, logs: &lockedBuffer{}, env: p.ClientEnv()}
	client := asynq.NewClientFromRedisClient(rdb)
	b.insp = asynq.NewInspectorFromRedisClient(rdb)
	redirects, err := connect.ParseRedirects("https://app.example.com")
	require.NoError(t, err)
	mux := http.NewServeMux()
	b.srv = httptest.NewServer(mux)
	t.Cleanup(b.srv.Close)
	b.flow, err = connect.New(connect.Config{
		Store: store, Catalog: cat, States: state.NewFlowStates(rdb, ""), Notifier: scheduler.NewNotifier(client, cat),
		Redirects: redirects, PublicURL: b.srv.URL, Getenv: func(k string) string { return b.env[k] },
		NowFunc: b.clock.Now, Logger: slog.New(slog.NewTextHandler(b.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	require.NoError(t, err)
	mux.HandleFunc("GET /start", func(w http.ResponseWriter, r *http.Request) {
		s, err := b.flow.Start(r.Context(), b.req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		b.flow.Redirect(w, r, s)
	})
	mux.HandleFunc("GET "+connect.CallbackPath, b.flow.Callback)
	b.req = connect.Request{ConsumerID: "c1", UnifiedAPI: "crm", ServiceID: sim.Salesforce, SessionID: "s1",
		SessionExpiry: b.clock.Now().Add(time.Hour), RedirectURI: appURL, Bind: true}
	return b
}

// browser is a cookie-keeping client that does not follow redirects.
func browser(t *testing.T) *http.Client {
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	return &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

func do(t *testing.T, c *http.Client, method, u string, form url.Values) (*http.Response, string) {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, u, body)
	require.NoError(t, err)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

// consent starts a flow in c and answers the provider's page; it returns
// the callback URL the provider sent the browser to.
func (b *bench) consent(t *testing.T, c *http.Client, decision string, scopes ...string) *url.URL {
	t.Helper()
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+"/start", nil)
	require.Equal(t, http.StatusFound, resp.StatusCode)
	authz, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	resp, page := do(t, c, http.MethodGet, authz.String(), nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, page, "Allow")
	form := authz.Query()
	form.Set("username", "ada@acme.example")
	form.Set("password", sim.DemoPassword)
	form.Set("decision", decision)
	if scopes == nil {
		scopes = strings.Fields(form.Get("scope"))
	}
	form["grant_scope"] = scopes
	post := *authz
	post.RawQuery = ""
	resp, _ = do(t, c, http.MethodPost, post.String(), form)
	require.Equal(t, http.StatusFound, resp.StatusCode)
	cb, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	require.Equal(t, connect.CallbackPath, cb.Path)
	return cb
}

func outcome(t *testing.T, resp *http.Response) url.Values {
	t.Helper()
	require.Equal(t, http.StatusFound, resp.StatusCode)
	loc, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	require.Equal(t, "app.example.com", loc.Host)
	return loc.Query()
}

func TestConnectSalesforce(t *testing.T) {
	b := setup(t)
	c := browser(t)
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+"/start", nil)
	authz, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	q := authz.Query()
	require.Equal(t, "S256", q.Get("code_challenge_method"), "the catalog asks for PKCE")
	require.NotEmpty(t, q.Get("code_challenge"))
	require.Equal(t, b.srv.URL+connect.CallbackPath, q.Get("redirect_uri"))
	require.Equal(t, "api refresh_token", q.Get("scope"))
	require.NotContains(t, authz.String(), b.env["SALESFORCE_CLIENT_SECRET"])

	// The state lives in Redis with a TTL.
	keys, err := b.rdb.Keys(context.Background(), state.DefaultPrefix+":connect:state:*").Result()
	require.NoError(t, err)
	require.Len(t, keys, 1)
	ttl, err := b.rdb.PTTL(context.Background(), keys[0]).Result()
	require.NoError(t, err)
	require.Greater(t, ttl, time.Duration(0))
	require.LessOrEqual(t, ttl, connect.DefaultStateTTL)

	cb := b.consent(t, c, "allow")
	code := cb.Query().Get("code")
	require.NotEmpty(t, code)
	resp, _ = do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	out := outcome(t, resp)
	require.Equal(t, url.Values{"status": {"connected"}, "connection": {"crm+salesforce"}}, out)

	got, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"})
	require.NoError(t, err)
	require.NotEmpty(t, got.Credentials.AccessToken)
	require.NotEmpty(t, got.Credentials.RefreshToken)
	require.Equal(t, b.p.BaseURL(sim.Salesforce), got.Settings["instance_url"], "from_token: instance_url")
	require.ElementsMatch(t, []string{"api", "refresh_token"}, got.GrantedScopes)
	require.Equal(t, state.Callable, got.State)

	// The first validation is queued.
	pending, err := b.insp.ListPendingTasks(tasks.QueueCritical)
	require.NoError(t, err)
	require.NotEmpty(t, pending)
	require.Equal(t, tasks.TypeValidate, pending[0].Type)

	// Replaying the callback finds no state: nothing happens.
	resp, page := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, page, "already used or has expired")
	again, err := b.store.Get(context.Background(), got.Ref())
	require.NoError(t, err)
	require.Equal(t, got.Version, again.Version)

	// Nothing secret in the logs.
	logs := b.logs.String()
	require.Contains(t, logs, "connect: flow finished")
	for _, secret := range []string{code, got.Credentials.AccessToken, got.Credentials.RefreshToken, cb.Query().Get("state"),
		b.env["SALESFORCE_CLIENT_SECRET"]} {
		require.NotContains(t, logs, secret)
	}
}

func TestConnectDenied(t *testing.T) {
	b := setup(t)
	c := browser(t)
	cb := b.consent(t, c, "deny")
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, url.Values{"status": {"denied"}, "reason": {"access_denied"}, "connection": {"crm+salesforce"}}, outcome(t, resp))
	_, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"})
	require.ErrorIs(t, err, state.ErrNotFound)
}

func TestConnectMissingScope(t *testing.T) {
	b := setup(t)
	c := browser(t)
	cb := b.consent(t, c, "allow", "api")
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, "missing_scopes", outcome(t, resp).Get("reason"))
	got, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"})
	require.NoError(t, err)
	require.Equal(t, state.Invalid, got.State)
	require.Equal(t, state.HealthMissingScopes, got.Health)
}

// A state that comes back in another browser (no binding cookie) is
// refused and consumed; nothing is stored.
func TestConnectForeignBrowser(t *testing.T) {
	b := setup(t)
	cb := b.consent(t, browser(t), "allow")
	resp, page := do(t, browser(t), http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.Contains(t, page, "another browser")
	_, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"})
	require.ErrorIs(t, err, state.ErrNotFound)
}

func TestConnectSessionExpired(t *testing.T) {
	b := setup(t)
	b.req.SessionExpiry = b.clock.Now().Add(time.Minute)
	c := browser(t)
	cb := b.consent(t, c, "allow")
	b.clock.Advance(2 * time.Minute)
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, "session_expired", outcome(t, resp).Get("reason"))
	_, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"})
	require.ErrorIs(t, err, state.ErrNotFound)

	// And a session already over cannot start a flow.
	_, err = b.flow.Start(context.Background(), b.req)
	require.ErrorIs(t, err, connect.ErrSessionExpired)
}

func TestConnectTokenEndpointError(t *testing.T) {
	b := setup(t)
	c := browser(t)
	cb := b.consent(t, c, "allow")
	b.env["SALESFORCE_CLIENT_SECRET"] = "wrong-secret-for-the-exchange"
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, "token_exchange_failed", outcome(t, resp).Get("reason"))
	require.Contains(t, b.logs.String(), "oauth_error=invalid_client")
	require.NotContains(t, b.logs.String(), cb.Query().Get("code"))
	require.NotContains(t, b.logs.String(), "wrong-secret-for-the-exchange")
}

// PKCE: a code whose verifier is lost cannot be exchanged.
func TestSimRefusesCodeWithoutVerifier(t *testing.T) {
	b := setup(t)
	c := browser(t)
	cb := b.consent(t, c, "allow")
	form := url.Values{"grant_type": {"authorization_code"}, "code": {cb.Query().Get("code")},
		"redirect_uri": {b.flow.CallbackURL()}, "client_id": {b.env["SALESFORCE_CLIENT_ID"]},
		"client_secret": {b.env["SALESFORCE_CLIENT_SECRET"]}}
	resp, body := do(t, http.DefaultClient, http.MethodPost, b.p.BaseURL(sim.Salesforce)+"/services/oauth2/token", form)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, body, "code_verifier")
}

func TestConnectRedirectNotAllowed(t *testing.T) {
	b := setup(t)
	for _, bad := range []string{"https://evil.example/cb", "http://app.example.com/x", "https://app.example.com.evil.example/",
		"https://user@app.example.com/", "javascript:alert(1)"} {
		b.req.RedirectURI = bad
		_, err := b.flow.Start(context.Background(), b.req)
		require.ErrorIs(t, err, connect.ErrRedirectNotAllowed, bad)
	}
	b.req.RedirectURI = "https://app.example.com/any/path?x=1"
	_, err := b.flow.Start(context.Background(), b.req)
	require.NoError(t, err, "an origin entry allows every path of the origin")
}

func TestConnectNotOAuth(t *testing.T) {
	b := setup(t)
	b.req.UnifiedAPI, b.req.ServiceID = "hris", sim.BambooHR
	_, err := b.flow.Start(context.Background(), b.req)
	require.ErrorIs(t, err, connect.ErrNotOAuth)
	b.req.UnifiedAPI, b.req.ServiceID = "hris", sim.Salesforce // wrong unified API
	_, err = b.flow.Start(context.Background(), b.req)
	require.ErrorIs(t, err, connect.ErrNotOAuth)
}

// Xero: authorized until a tenant is picked from the provider's list.
func TestConnectXeroTenantThenRevoke(t *testing.T) {
	b := setup(t)
	b.req.UnifiedAPI, b.req.ServiceID = "accounting", sim.Xero
	c := browser(t)
	cb := b.consent(t, c, "allow")
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+cb.RequestURI(), nil)
	require.Equal(t, "connected", outcome(t, resp).Get("status"))
	ref := state.Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	got, err := b.store.Get(context.Background(), ref)
	require.NoError(t, err)
	require.Equal(t, state.Authorized, got.State)
	require.Equal(t, state.HealthMissingSettings, got.Health)

	choices, err := b.flow.Choices(context.Background(), got, "tenant_id")
	require.NoError(t, err)
	require.Len(t, choices, 1)
	require.Equal(t, "Ada Ltd", choices[0].Label)
	ch, err := b.store.Patch(context.Background(), ref, state.Input{Settings: map[string]string{"tenant_id": choices[0].Value}}, 0)
	require.NoError(t, err)
	require.Equal(t, state.Callable, ch.After.State)

	_, err = b.flow.Choices(context.Background(), got, "nope")
	require.ErrorIs(t, err, connect.ErrNoChoices)

	// Disconnect revokes at the provider: the refresh token is dead.
	revoked, err := b.flow.Revoke(context.Background(), ch.After)
	require.NoError(t, err)
	require.True(t, revoked)
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {ch.After.Credentials.RefreshToken}}
	req, err := http.NewRequest(http.MethodPost, b.p.BaseURL(sim.Xero)+"/connect/token", strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(b.env["XERO_CLIENT_ID"], b.env["XERO_CLIENT_SECRET"])
	r2, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(r2.Body)
	_ = r2.Body.Close()
	require.Equal(t, http.StatusBadRequest, r2.StatusCode)
	require.Contains(t, string(body), "invalid_grant")
}

func TestParseRedirects(t *testing.T) {
	r, err := connect.ParseRedirects("https://app.example.com/cb, http://127.0.0.1:3000")
	require.NoError(t, err)
	require.True(t, r.Allowed("https://app.example.com/cb"))
	require.False(t, r.Allowed("https://app.example.com/cb/other"), "an entry with a path is exact")
	require.True(t, r.Allowed("http://127.0.0.1:3000/anything"))
	require.False(t, r.Allowed("http://127.0.0.1:3001/"))
	for _, bad := range []string{"http://app.example.com", "ftp://x", "https://u@x.example", "/relative"} {
		_, err := connect.ParseRedirects(bad)
		require.Error(t, err, bad)
	}
	require.False(t, (*connect.Redirects)(nil).Allowed("https://app.example.com/cb"))
}

// The simulated authorization endpoint behaves like a real one: a wrong
// password shows the login again, a code is single-use and bound to its
// redirect URI.
func TestSimAuthorizationEndpoint(t *testing.T) {
	b := setup(t)
	c := browser(t)
	resp, _ := do(t, c, http.MethodGet, b.srv.URL+"/start", nil)
	authz, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	form := authz.Query()
	form.Set("username", "ada")
	form.Set("password", "not-the-password")
	form.Set("decision", "allow")
	post := *authz
	post.RawQuery = ""
	resp, page := do(t, c, http.MethodPost, post.String(), form)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	require.Contains(t, page, "Wrong user name or password")

	exchange := func(code, redirect string) (int, string) {
		f := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirect},
			"client_id": {b.env["SALESFORCE_CLIENT_ID"]}, "client_secret": {b.env["SALESFORCE_CLIENT_SECRET"]},
			"code_verifier": {"irrelevant-without-challenge"}}
		resp, body := do(t, http.DefaultClient, http.MethodPost, b.p.BaseURL(sim.Salesforce)+"/services/oauth2/token", f)
		return resp.StatusCode, body
	}
	// A flow without PKCE (the request's challenge dropped) to test the
	// code's other bindings.
	q := authz.Query()
	q.Del("code_challenge")
	q.Del("code_challenge_method")
	q.Set("username", "ada")
	q.Set("password", sim.DemoPassword)
	q.Set("decision", "allow")
	q["grant_scope"] = []string{"api", "refresh_token"}
	resp, _ = do(t, c, http.MethodPost, post.String(), q)
	require.Equal(t, http.StatusFound, resp.StatusCode)
	cb, err := url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	code := cb.Query().Get("code")
	status, body := exchange(code, "https://elsewhere.example/cb")
	require.Equal(t, http.StatusBadRequest, status)
	require.Contains(t, body, "redirect_uri mismatch")
	status, body = exchange(code, b.flow.CallbackURL())
	require.Equal(t, http.StatusBadRequest, status, "a code that failed once is gone")
	require.Contains(t, body, "unknown or used")

	resp, _ = do(t, c, http.MethodPost, post.String(), q)
	cb, err = url.Parse(resp.Header.Get("Location"))
	require.NoError(t, err)
	code = cb.Query().Get("code")
	status, body = exchange(code, b.flow.CallbackURL())
	require.Equal(t, http.StatusOK, status, body)
	require.Contains(t, body, "access_token")
	status, _ = exchange(code, b.flow.CallbackURL())
	require.Equal(t, http.StatusBadRequest, status, "single use")
}
