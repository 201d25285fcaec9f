package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/internal/simtest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
)

type sessionBundle struct {
	*bundle
	p       *sim.Providers
	keys    *session.Keys
	keySpec string
	env     map[string]string
}

// setupSessions serves the API with sessions and the connect flow over the
// simulated providers' catalog.
func setupSessions(t *testing.T) *sessionBundle {
	t.Helper()
	se := simtest.Start(t)
	p, cat, rdb, st := se.Providers, se.Catalog, se.Redis, se.Store
	client := asynq.NewClientFromRedisClient(rdb)
	notifier := &recordingNotifier{next: scheduler.NewNotifier(client, cat)}
	spec := session.NewKey("new") + "," + session.NewKey("old")
	keys, err := session.ParseKeys(spec)
	require.NoError(t, err)
	redirects, err := connect.ParseRedirects("https://app.example.com")
	require.NoError(t, err)
	env := p.ClientEnv()
	flow, err := connect.New(connect.Config{Store: st, Catalog: cat, States: state.NewFlowStates(rdb, ""), Notifier: notifier, Redirects: redirects,
		PublicURL: "https://vault.example.com", Getenv: func(k string) string { return env[k] }})
	require.NoError(t, err)
	h, err := api.New(api.Config{Store: st, Catalog: cat, Notifier: notifier, Enqueuer: client,
		Tokens: mustTokens(t, testToken), Sessions: keys, Connect: flow, PublicURL: "https://vault.example.com"})
	require.NoError(t, err)
	b := &bundle{rdb: rdb, store: st, cat: cat, notifier: notifier, inspector: asynq.NewInspectorFromRedisClient(rdb)}
	b.srv = httptest.NewServer(h)
	t.Cleanup(b.srv.Close)
	// Redirects are answers to check, not to follow.
	b.srv.Client().CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &sessionBundle{bundle: b, p: p, keys: keys, keySpec: spec, env: env}
}

func (b *sessionBundle) token(t *testing.T, o session.Options) string {
	t.Helper()
	if o.ConsumerID == "" {
		o.ConsumerID = "c1"
	}
	tok, _, err := b.keys.Issue(o, time.Now())
	require.NoError(t, err)
	return tok
}

// sreq sends a request with a session token (and no app id).
func (b *sessionBundle) sreq(t *testing.T, tok, method, path, body string, hdr ...string) response {
	t.Helper()
	return b.req(t, method, path, body, append([]string{"Authorization: Bearer " + tok}, hdr...)...)
}

func TestCreateSession(t *testing.T) {
	b := setupSessions(t)
	r := b.req(t, "POST", "/vault/sessions", `{"consumer_metadata":{"account_name":"Acme"},"redirect_uri":"https://app.example.com/done",
		"settings":{"unified_apis":["crm"],"session_length":"1d","allow_actions":["disable"]},"theme":{"vault_name":"x"}}`,
		"x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	d := r.data(t)
	tok, _ := d["session_token"].(string)
	require.Equal(t, "https://vault.example.com/vault/session?token="+tok, d["session_uri"])
	c, err := b.keys.Verify(tok, time.Now())
	require.NoError(t, err)
	require.Equal(t, "c1", c.ConsumerID())
	require.Equal(t, []string{"crm"}, c.UnifiedAPIs)
	require.Equal(t, []session.Action{session.ActionDisable}, c.AllowActions)
	require.Equal(t, "https://app.example.com/done", c.RedirectURI)
	require.WithinDuration(t, time.Now().Add(24*time.Hour), c.ExpiresAt.Time, time.Minute)
	consumer, err := b.store.GetConsumer(context.Background(), "c1")
	require.NoError(t, err)
	require.JSONEq(t, `{"account_name":"Acme"}`, string(consumer.Metadata), "consumer_metadata is the consumer's metadata")

	// Omitted allow_actions allows all; an empty list none.
	r = b.req(t, "POST", "/vault/sessions", `{"settings":{}}`, "x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	c, err = b.keys.Verify(r.data(t)["session_token"].(string), time.Now())
	require.NoError(t, err)
	require.Nil(t, c.AllowActions)
	require.WithinDuration(t, time.Now().Add(time.Hour), c.ExpiresAt.Time, time.Minute, "default 1h")
	r = b.req(t, "POST", "/vault/sessions", `{"settings":{"allow_actions":[]}}`, "x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	c, err = b.keys.Verify(r.data(t)["session_token"].(string), time.Now())
	require.NoError(t, err)
	require.NotNil(t, c.AllowActions)
	require.Empty(t, c.AllowActions)

	for body, want := range map[string]string{
		`{"settings":{"session_length":"2w"}}`:               "session_length",
		`{"settings":{"allow_actions":["launch"]}}`:          "allow_actions",
		`{"redirect_uri":"https://evil.example/cb"}`:         "redirect_uri",
		`{"settings":{"unified_apis":["Not An Id"]}}`:        "unified_apis",
		`{"settings":{"session_length":"forever and ever"}}`: "session_length",
	} {
		r := b.req(t, "POST", "/vault/sessions", body, "x-apideck-app-id: app", "x-apideck-consumer-id: c1")
		require.Equal(t, http.StatusBadRequest, r.status, body)
		require.Contains(t, string(r.body), want)
	}
	// No consumer, no session.
	r = b.req(t, "POST", "/vault/sessions", `{}`, "x-apideck-app-id: app")
	require.Equal(t, http.StatusBadRequest, r.status)
	// A session cannot open sessions.
	r = b.sreq(t, b.token(t, session.Options{}), "POST", "/vault/sessions", `{}`, "x-apideck-consumer-id: c1")
	require.Equal(t, "ForbiddenError", vaultErr(t, r, http.StatusForbidden))
}

func TestSessionTokenWhere(t *testing.T) {
	b := setupSessions(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, state.Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"},
		state.Input{Settings: map[string]string{"subdomain": "mine"}}, 0)
	require.NoError(t, err)
	_, err = b.store.Put(ctx, state.Ref{ConsumerID: "c2", ConnectionID: "hris+bamboohr"},
		state.Input{Settings: map[string]string{"subdomain": "theirs"}}, 0)
	require.NoError(t, err)
	tok := b.token(t, session.Options{})

	// Its own connections, without app or consumer header.
	r := b.sreq(t, tok, "GET", "/vault/connections/hris/bamboohr", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, map[string]any{"subdomain": "mine"}, r.data(t)["settings"])
	r = b.sreq(t, tok, "GET", "/vault/connections/hris/bamboohr", "", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusOK, r.status)
	// Another consumer: 403, whatever the route.
	r = b.sreq(t, tok, "GET", "/vault/connections/hris/bamboohr", "", "x-apideck-consumer-id: c2")
	require.Equal(t, "ForbiddenError", vaultErr(t, r, http.StatusForbidden))
	r = b.sreq(t, tok, "DELETE", "/vault/connections/hris/bamboohr", "", "x-apideck-consumer-id: c2")
	require.Equal(t, http.StatusForbidden, r.status)
	_, err = b.store.Get(ctx, state.Ref{ConsumerID: "c2", ConnectionID: "hris+bamboohr"})
	require.NoError(t, err, "c2's connection is untouched")

	// Never on /v1, /vault/consumers, /vault/sessions.
	for _, rt := range [][2]string{{"GET", "/v1/connections"}, {"GET", "/v1/consumers/c1/connections"},
		{"DELETE", "/v1/consumers/c1/connections/hris/bamboohr"}} {
		r := b.sreq(t, tok, rt[0], rt[1], "")
		require.Equal(t, http.StatusUnauthorized, r.status, rt[1])
	}
	for _, rt := range [][2]string{{"GET", "/vault/consumers"}, {"GET", "/vault/consumers/c1"}, {"DELETE", "/vault/consumers/c1"}} {
		r := b.sreq(t, tok, rt[0], rt[1], "")
		require.Equal(t, http.StatusForbidden, r.status, rt[1])
	}
	_, err = b.store.Get(ctx, state.Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"})
	require.NoError(t, err)

	// Unified APIs outside the session: 404, and not listed.
	crm := b.token(t, session.Options{UnifiedAPIs: []string{"crm"}})
	r = b.sreq(t, crm, "GET", "/vault/connections/hris/bamboohr", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, http.StatusNotFound))
	r = b.sreq(t, crm, "GET", "/vault/connections", "")
	require.Equal(t, http.StatusOK, r.status)
	var list struct{ Data []map[string]any }
	require.NoError(t, json.Unmarshal(r.body, &list))
	require.NotEmpty(t, list.Data)
	for _, c := range list.Data {
		require.Equal(t, "crm", c["unified_api"])
	}

	// Bad tokens: expired, forged, signed by a retired key, wrong audience.
	expired, _, err := b.keys.Issue(session.Options{ConsumerID: "c1", Length: time.Minute}, time.Now().Add(-2*time.Minute))
	require.NoError(t, err)
	old, err := session.ParseKeys(strings.Split(b.keySpec, ",")[1])
	require.NoError(t, err)
	oldTok, _, err := old.Issue(session.Options{ConsumerID: "c1"}, time.Now())
	require.NoError(t, err)
	r = b.sreq(t, oldTok, "GET", "/vault/connections", "")
	require.Equal(t, http.StatusOK, r.status, "a rotated (not retired) key still verifies")
	retired, err := session.ParseKeys(session.NewKey("gone"))
	require.NoError(t, err)
	retiredTok, _, err := retired.Issue(session.Options{ConsumerID: "c1"}, time.Now())
	require.NoError(t, err)
	for name, bad := range map[string]string{"expired": expired, "forged": tok[:len(tok)-4] + "AAAA", "retired": retiredTok} {
		r := b.sreq(t, bad, "GET", "/vault/connections", "")
		require.Equal(t, "UnauthorizedError", vaultErr(t, r, http.StatusUnauthorized), name)
		require.NotContains(t, string(r.body), bad, name)
		r = b.sreq(t, bad, "DELETE", "/vault/connections/hris/bamboohr", "")
		require.Equal(t, http.StatusUnauthorized, r.status, name)
	}
	r = b.sreq(t, expired, "GET", "/vault/connections", "")
	require.Contains(t, string(r.body), "expired")
}

// Each allow_actions entry, refused then allowed, on the server.
func TestSessionAllowActions(t *testing.T) {
	b := setupSessions(t)
	ctx := context.Background()
	ref := state.Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"}
	reset := func() {
		_, _ = b.store.Delete(ctx, ref, 0)
		_, err := b.store.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k1"},
			Settings: map[string]string{"subdomain": "acme"}}, 0)
		require.NoError(t, err)
	}
	all := func(except session.Action) []session.Action {
		var out []session.Action
		for _, a := range session.Actions() {
			if a != except {
				out = append(out, a)
			}
		}
		return out
	}
	for _, tc := range []struct {
		action       session.Action
		method, body string
		after        func(t *testing.T)
	}{
		{session.ActionDelete, "DELETE", "", func(t *testing.T) {
			_, err := b.store.Get(ctx, ref)
			require.ErrorIs(t, err, state.ErrNotFound)
		}},
		{session.ActionDisable, "PATCH", `{"enabled":false}`, func(t *testing.T) {
			c, err := b.store.Get(ctx, ref)
			require.NoError(t, err)
			require.False(t, c.Enabled)
		}},
		{session.ActionDisconnect, "PATCH", `{"settings":{"api_key":null}}`, func(t *testing.T) {
			c, err := b.store.Get(ctx, ref)
			require.NoError(t, err)
			require.Empty(t, c.Credentials.Fields())
		}},
		{session.ActionReauthorize, "PATCH", `{"settings":{"api_key":"k2"}}`, func(t *testing.T) {
			c, err := b.store.Get(ctx, ref)
			require.NoError(t, err)
			require.Equal(t, "k2", c.Credentials.APIKey)
		}},
	} {
		t.Run(string(tc.action), func(t *testing.T) {
			reset()
			refused := b.token(t, session.Options{AllowActions: all(tc.action)})
			r := b.sreq(t, refused, tc.method, "/vault/connections/hris/bamboohr", tc.body)
			require.Equal(t, "ForbiddenError", vaultErr(t, r, http.StatusForbidden))
			require.Contains(t, string(r.body), "action "+string(tc.action)+" is not allowed")
			c, err := b.store.Get(ctx, ref)
			require.NoError(t, err)
			require.Equal(t, "k1", c.Credentials.APIKey)
			require.True(t, c.Enabled)

			allowed := b.token(t, session.Options{AllowActions: []session.Action{tc.action}})
			r = b.sreq(t, allowed, tc.method, "/vault/connections/hris/bamboohr", tc.body)
			require.Less(t, r.status, 300, "%s", r.body)
			tc.after(t)
		})
	}

	// An empty list still lets the consumer add a first connection, change
	// settings and enable.
	none := b.token(t, session.Options{AllowActions: []session.Action{}})
	r := b.sreq(t, none, "PATCH", "/vault/connections/crm/pipedrive", `{"settings":{"api_key":"first"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.sreq(t, none, "PATCH", "/vault/connections/crm/pipedrive", `{"settings":{"api_key":"second"}}`)
	require.Equal(t, http.StatusForbidden, r.status)
	r = b.sreq(t, none, "PATCH", "/vault/connections/crm/pipedrive", `{"enabled":true}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	// Omitted allows everything.
	r = b.sreq(t, b.token(t, session.Options{}), "DELETE", "/vault/connections/crm/pipedrive", "")
	require.Equal(t, http.StatusNoContent, r.status, "%s", r.body)
}

// The OAuth flow from the API, reauthorize enforced, revocation on
// disconnect, and the view's authorize_url and revoke_url.
func TestSessionAuthorizeAndRevoke(t *testing.T) {
	b := setupSessions(t)
	ctx := context.Background()
	tok := b.token(t, session.Options{AllowActions: []session.Action{}})
	r := b.sreq(t, tok, "GET", "/vault/connections/accounting/xero/authorize", "")
	require.Equal(t, http.StatusFound, r.status, "%s", r.body)
	loc, err := url.Parse(r.header.Get("Location"))
	require.NoError(t, err)
	require.Equal(t, b.p.BaseURL(sim.Xero), loc.Scheme+"://"+loc.Host)
	require.Equal(t, "https://vault.example.com/vault/callback", loc.Query().Get("redirect_uri"))
	require.Equal(t, "S256", loc.Query().Get("code_challenge_method"))

	// Scripts ask for the URL instead of a redirect.
	r = b.sreq(t, tok, "GET", "/vault/connections/accounting/xero/authorize", "", "Accept: application/json")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	u, _ := r.data(t)["authorize_url"].(string)
	require.True(t, strings.HasPrefix(u, b.p.BaseURL(sim.Xero)+"/identity/connect/authorize?"), u)

	// Not an OAuth integration: 422.
	r = b.sreq(t, tok, "GET", "/vault/connections/hris/bamboohr/authorize", "")
	require.Equal(t, http.StatusUnprocessableEntity, r.status)
	// Operators name an allowed redirect_uri, or none.
	r = b.req(t, "GET", "/vault/connections/accounting/xero/authorize?redirect_uri="+url.QueryEscape("https://evil.example/"), "",
		"x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusBadRequest, r.status)
	r = b.req(t, "GET", "/vault/connections/accounting/xero/authorize?redirect_uri="+url.QueryEscape("https://app.example.com/x"), "",
		"x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusFound, r.status, "%s", r.body)

	// Connected: reauthorizing needs the action.
	g, err := b.p.IssueOAuth(sim.Xero)
	require.NoError(t, err)
	ref := state.Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	_, err = b.store.Put(ctx, ref, state.Input{Credentials: g.Credentials(), Settings: map[string]string{"tenant_id": g.Tenants[0].ID}}, 0)
	require.NoError(t, err)
	r = b.sreq(t, tok, "GET", "/vault/connections/accounting/xero/authorize", "")
	require.Equal(t, http.StatusForbidden, r.status)
	require.Contains(t, string(r.body), "reauthorize")
	r = b.sreq(t, b.token(t, session.Options{AllowActions: []session.Action{session.ActionReauthorize}}), "GET",
		"/vault/connections/accounting/xero/authorize", "")
	require.Equal(t, http.StatusFound, r.status)

	// The view links the flow and the provider's revocation.
	r = b.sreq(t, tok, "GET", "/vault/connections/accounting/xero", "")
	require.Equal(t, http.StatusOK, r.status)
	d := r.data(t)
	require.Equal(t, "https://vault.example.com/vault/connections/accounting/xero/authorize", d["authorize_url"])
	require.Equal(t, b.p.BaseURL(sim.Xero)+"/connect/revocation", d["revoke_url"])

	// Disconnect clears the tokens and revokes the grant at the provider.
	r = b.sreq(t, b.token(t, session.Options{AllowActions: []session.Action{session.ActionDisconnect}}), "PATCH",
		"/vault/connections/accounting/xero", `{"settings":{"access_token":null,"refresh_token":null}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	c, err := b.store.Get(ctx, ref)
	require.NoError(t, err)
	require.Empty(t, c.Credentials.Fields())
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {g.RefreshToken}}
	req, err := http.NewRequest(http.MethodPost, b.p.BaseURL(sim.Xero)+"/connect/token", strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(b.env["XERO_CLIENT_ID"], b.env["XERO_CLIENT_SECRET"])
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, "the refresh token was revoked at the provider")
}

// Reading a PATCH body for the session checks leaves the handler's own
// limit in charge: a body too large is still 413.
func TestSessionPatchBodyLimit(t *testing.T) {
	b := setupSessions(t)
	big := `{"settings":{"tenant_id":"` + strings.Repeat("x", 2<<20) + `"}}`
	r := b.sreq(t, b.token(t, session.Options{}), "PATCH", "/vault/connections/accounting/xero", big)
	require.Equal(t, http.StatusRequestEntityTooLarge, r.status, "%.200s", r.body)
	r = b.req(t, "PATCH", "/vault/connections/accounting/xero", big, "x-apideck-app-id: app", "x-apideck-consumer-id: c1")
	require.Equal(t, http.StatusRequestEntityTooLarge, r.status, "%.200s", r.body)
}
