package vaultpage_test

import (
	"context"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/internal/simtest"
	"github.com/vaultfleet/vaultfleet/internal/vaultpage"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
)

func TestMain(m *testing.M) { redistest.Main(m) }

type bench struct {
	p     *sim.Providers
	srv   *httptest.Server
	store *state.Store
	keys  *session.Keys
}

func setup(t *testing.T) *bench {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	se := simtest.Start(t)
	p, cat, rdb, store := se.Providers, se.Catalog, se.Redis, se.Store
	keys, err := session.ParseKeys(session.NewKey("s1"))
	require.NoError(t, err)
	n := scheduler.NewNotifier(asynq.NewClientFromRedisClient(rdb), cat)
	mux := http.NewServeMux()
	srv := httptest.NewUnstartedServer(mux)
	// serve's short timeouts, shorter: the event stream outlives them.
	srv.Config.ReadTimeout, srv.Config.WriteTimeout = 300*time.Millisecond, 300*time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)
	env := p.ClientEnv()
	flow, err := connect.New(connect.Config{Store: store, Catalog: cat, States: state.NewFlowStates(rdb, ""), Notifier: n, PublicURL: srv.URL,
		Getenv: func(k string) string { return env[k] }})
	require.NoError(t, err)
	h, err := vaultpage.New(vaultpage.Config{Store: store, Catalog: cat, Sessions: keys, Flow: flow, Notifier: n,
		Done: ctx.Done(), PollInterval: 20 * time.Millisecond})
	require.NoError(t, err)
	mux.Handle("/", h)
	return &bench{p: p, srv: srv, store: store, keys: keys}
}

func (b *bench) session(t *testing.T, o session.Options) (*http.Client, string) {
	t.Helper()
	if o.ConsumerID == "" {
		o.ConsumerID = "c1"
	}
	tok, _, err := b.keys.Issue(o, time.Now())
	require.NoError(t, err)
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	c := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Get(b.srv.URL + vaultpage.SessionPath + "?token=" + url.QueryEscape(tok))
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Equal(t, vaultpage.PagePath, resp.Header.Get("Location"), "the token is stripped from the URL")
	return c, tok
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

func (b *bench) page(t *testing.T, c *http.Client) (string, string, http.Header) {
	t.Helper()
	resp, err := c.Get(b.srv.URL + vaultpage.PagePath)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	m := csrfRE.FindStringSubmatch(string(body))
	csrf := ""
	if m != nil {
		csrf = m[1]
	}
	return string(body), csrf, resp.Header
}

func (b *bench) post(t *testing.T, c *http.Client, path, csrf string, form url.Values, hdr map[string]string) *http.Response {
	t.Helper()
	if form == nil {
		form = url.Values{}
	}
	if csrf != "" {
		form.Set("csrf", csrf)
	}
	req, err := http.NewRequest(http.MethodPost, b.srv.URL+vaultpage.PagePath+"/connections/"+path, strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	return resp
}

var bamboo = state.Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"}

func TestPageHeaders(t *testing.T) {
	b := setup(t)
	c, tok := b.session(t, session.Options{})
	body, _, h := b.page(t, c)
	require.Equal(t, "DENY", h.Get("X-Frame-Options"))
	cspv := h.Get("Content-Security-Policy")
	require.Contains(t, cspv, "frame-ancestors 'none'")
	require.Contains(t, cspv, "script-src 'self'")
	require.NotContains(t, cspv, "unsafe-inline")
	require.NotContains(t, body, "<script>", "no inline script")
	require.NotContains(t, body, tok)
	u, _ := url.Parse(b.srv.URL)
	for _, ck := range c.Jar.Cookies(&url.URL{Scheme: "http", Host: u.Host, Path: "/vault/page"}) {
		require.NotEqual(t, "", ck.Value)
	}
}

func TestSessionProblems(t *testing.T) {
	b := setup(t)
	for name, tok := range map[string]string{"Garbage": "x.y.z", "Empty": ""} {
		resp, err := http.Get(b.srv.URL + vaultpage.SessionPath + "?token=" + tok)
		require.NoError(t, err, name)
		_ = resp.Body.Close()
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode, name)
	}
	// An expired session's cookie opens nothing.
	tok, _, err := b.keys.Issue(session.Options{ConsumerID: "c1", Length: time.Minute}, time.Now().Add(-2*time.Minute))
	require.NoError(t, err)
	req, _ := http.NewRequest(http.MethodGet, b.srv.URL+vaultpage.PagePath, nil)
	req.AddCookie(&http.Cookie{Name: vaultpage.SessionCookie, Value: tok})
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	require.Contains(t, string(body), "expired")
}

func TestCSRF(t *testing.T) {
	b := setup(t)
	c, _ := b.session(t, session.Options{})
	_, csrf, _ := b.page(t, c)
	require.NotEmpty(t, csrf)
	form := url.Values{"set_subdomain": {"acme"}}
	// No token, a token of another session, a cross-site request: refused.
	require.Equal(t, http.StatusForbidden, b.post(t, c, "hris/bamboohr/settings", "", form, nil).StatusCode)
	other, _ := b.session(t, session.Options{})
	_, otherCSRF, _ := b.page(t, other)
	require.NotEqual(t, csrf, otherCSRF)
	require.Equal(t, http.StatusForbidden, b.post(t, c, "hris/bamboohr/settings", otherCSRF, form, nil).StatusCode)
	require.Equal(t, http.StatusForbidden, b.post(t, c, "hris/bamboohr/settings", csrf, form,
		map[string]string{"Sec-Fetch-Site": "cross-site"}).StatusCode)
	require.Equal(t, http.StatusForbidden, b.post(t, c, "hris/bamboohr/settings", csrf, form,
		map[string]string{"Origin": "https://evil.example"}).StatusCode)
	_, err := b.store.Get(context.Background(), bamboo)
	require.ErrorIs(t, err, state.ErrNotFound, "no refused request wrote")
	// The real form passes.
	resp := b.post(t, c, "hris/bamboohr/settings", csrf, form, map[string]string{"Sec-Fetch-Site": "same-origin"})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	got, err := b.store.Get(context.Background(), bamboo)
	require.NoError(t, err)
	require.Equal(t, "acme", got.Settings["subdomain"])
}

// Every action the page offers is checked on the server.
func TestAllowActionsOnThePage(t *testing.T) {
	b := setup(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, bamboo, state.Input{Credentials: map[string]string{"api_key": "k"},
		Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)
	for _, tc := range []struct {
		path   string
		form   url.Values
		action session.Action
	}{
		{"hris/bamboohr/credentials", url.Values{"cred_api_key": {"k2"}}, session.ActionReauthorize},
		{"hris/bamboohr/disable", nil, session.ActionDisable},
		{"hris/bamboohr/disconnect", nil, session.ActionDisconnect},
		{"hris/bamboohr/delete", nil, session.ActionDelete},
	} {
		t.Run(string(tc.action), func(t *testing.T) {
			var others []session.Action
			for _, a := range session.Actions() {
				if a != tc.action {
					others = append(others, a)
				}
			}
			c, _ := b.session(t, session.Options{AllowActions: others})
			body, csrf, _ := b.page(t, c)
			if tc.action != session.ActionReauthorize {
				require.NotContains(t, body, `id="`+string(tc.action)+`-bamboohr"`, "the button is hidden")
			}
			resp := b.post(t, c, tc.path, csrf, tc.form, nil)
			require.Equal(t, http.StatusForbidden, resp.StatusCode)
			got, err := b.store.Get(ctx, bamboo)
			require.NoError(t, err)
			require.True(t, got.Enabled)
			require.Equal(t, "k", got.Credentials.APIKey)
		})
	}
	// Allowed: each goes through.
	c, _ := b.session(t, session.Options{AllowActions: session.Actions()})
	_, csrf, _ := b.page(t, c)
	require.Equal(t, http.StatusSeeOther, b.post(t, c, "hris/bamboohr/credentials", csrf, url.Values{"cred_api_key": {"k2"}}, nil).StatusCode)
	require.Equal(t, http.StatusSeeOther, b.post(t, c, "hris/bamboohr/disable", csrf, nil, nil).StatusCode)
	got, err := b.store.Get(ctx, bamboo)
	require.NoError(t, err)
	require.False(t, got.Enabled)
	require.Equal(t, "k2", got.Credentials.APIKey)
	require.Equal(t, http.StatusSeeOther, b.post(t, c, "hris/bamboohr/disconnect", csrf, nil, nil).StatusCode)
	got, err = b.store.Get(ctx, bamboo)
	require.NoError(t, err)
	require.Empty(t, got.Credentials.Fields())
	require.Equal(t, http.StatusSeeOther, b.post(t, c, "hris/bamboohr/delete", csrf, nil, nil).StatusCode)
	_, err = b.store.Get(ctx, bamboo)
	require.ErrorIs(t, err, state.ErrNotFound)
}

// unified_apis limits what the page lists and what it writes.
func TestUnifiedAPIs(t *testing.T) {
	b := setup(t)
	c, _ := b.session(t, session.Options{UnifiedAPIs: []string{"crm"}})
	body, csrf, _ := b.page(t, c)
	require.Contains(t, body, `id="integration-salesforce"`)
	require.NotContains(t, body, `id="integration-bamboohr"`)
	require.Equal(t, http.StatusNotFound, b.post(t, c, "hris/bamboohr/settings", csrf, url.Values{"set_subdomain": {"x"}}, nil).StatusCode)
}

// The event stream carries this consumer's changes only.
func TestEvents(t *testing.T) {
	b := setup(t)
	c, _ := b.session(t, session.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.srv.URL+vaultpage.PagePath+"/events", nil)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	// Past the server's read and write timeouts before anything happens.
	time.Sleep(500 * time.Millisecond)
	_, err = b.store.Put(context.Background(), state.Ref{ConsumerID: "c2", ConnectionID: "hris+bamboohr"},
		state.Input{Settings: map[string]string{"subdomain": "other"}}, 0)
	require.NoError(t, err)
	_, err = b.store.Put(context.Background(), bamboo, state.Input{Settings: map[string]string{"subdomain": "mine"}}, 0)
	require.NoError(t, err)
	var got strings.Builder
	buf := make([]byte, 4096)
	for !strings.Contains(got.String(), `"connection_id":"hris+bamboohr"`) {
		n, err := resp.Body.Read(buf)
		require.NoError(t, err, got.String())
		got.Write(buf[:n])
	}
	require.Contains(t, got.String(), "event: state")
	require.Regexp(t, `(?m)^id: [0-9]+-[0-9]+$`, got.String(), "events carry the stream id for Last-Event-ID")
	require.Equal(t, 1, strings.Count(got.String(), "event: state"), "c2's change is not sent: %s", got.String())
}

// A setting picked from the provider's list (Xero's tenant) must be on it.
func TestChoicesAreChecked(t *testing.T) {
	b := setup(t)
	g, err := b.p.IssueOAuth(sim.Xero)
	require.NoError(t, err)
	ref := state.Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	_, err = b.store.Put(context.Background(), ref, state.Input{Credentials: g.Credentials()}, 0)
	require.NoError(t, err)
	c, _ := b.session(t, session.Options{})
	body, csrf, _ := b.page(t, c)
	require.Contains(t, body, `<option value="`+g.Tenants[0].ID+`"`)
	resp := b.post(t, c, "accounting/xero/settings", csrf, url.Values{"set_tenant_id": {"someone-elses-tenant"}}, nil)
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Contains(t, resp.Header.Get("Location"), "refused")
	got, err := b.store.Get(context.Background(), ref)
	require.NoError(t, err)
	require.Empty(t, got.Settings["tenant_id"])
	require.Equal(t, state.Authorized, got.State)
	resp = b.post(t, c, "accounting/xero/settings", csrf, url.Values{"set_tenant_id": {g.Tenants[0].ID}}, nil)
	require.Contains(t, resp.Header.Get("Location"), "saved")
	got, err = b.store.Get(context.Background(), ref)
	require.NoError(t, err)
	require.Equal(t, state.Callable, got.State)
}

var eventsAttrRE = regexp.MustCompile(`data-events="([^"]+)"`)

// A change made after the page was rendered but before its event stream
// connected (a busy browser, a slow machine) still reaches the page: the
// stream starts where the page read the connections, not at its own start.
func TestEventsStartWhereThePageWasRendered(t *testing.T) {
	b := setup(t)
	c, _ := b.session(t, session.Options{})
	_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"},
		state.Input{Settings: map[string]string{}}, 0)
	require.NoError(t, err) // an event before the page: not to be replayed
	body, _, _ := b.page(t, c)
	m := eventsAttrRE.FindStringSubmatch(body)
	require.NotNil(t, m, "the page names its event stream")
	src := strings.ReplaceAll(m[1], "&amp;", "&")
	require.Contains(t, src, "?after=", "the stream starts where the page was rendered")

	// The change lands before the stream connects.
	_, err = b.store.Put(context.Background(), bamboo, state.Input{Settings: map[string]string{"subdomain": "mine"}}, 0)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.srv.URL+src, nil)
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var got strings.Builder
	buf := make([]byte, 4096)
	for !strings.Contains(got.String(), `"connection_id":"hris+bamboohr"`) {
		n, err := resp.Body.Read(buf)
		require.NoError(t, err, "the change made before the stream connected was not sent: %s", got.String())
		got.Write(buf[:n])
	}
	require.NotContains(t, got.String(), "crm+salesforce", "events before the page are not replayed")
}
