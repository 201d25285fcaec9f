package api_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) { redistest.Main(m) }

const testToken = "test-token-0123456789abcdef"

func mustTokens(t testing.TB, spec string) *auth.Tokens {
	t.Helper()
	toks, err := auth.ParseTokens(spec)
	require.NoError(t, err)
	return toks
}

// recordingNotifier wraps the real scheduler.Notifier and records every
// change it is handed.
type recordingNotifier struct {
	next    api.Notifier
	mu      sync.Mutex
	changes []state.Change
}

func (n *recordingNotifier) Notify(ctx context.Context, ch state.Change) error {
	n.mu.Lock()
	n.changes = append(n.changes, ch)
	n.mu.Unlock()
	return n.next.Notify(ctx, ch)
}

func (n *recordingNotifier) count() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.changes)
}

func (n *recordingNotifier) last() state.Change {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.changes[len(n.changes)-1]
}

type bundle struct {
	rdb       *redis.Client
	store     *state.Store
	cat       *catalog.Catalog
	srv       *httptest.Server
	inspector *asynq.Inspector
	notifier  *recordingNotifier
	reg       *prometheus.Registry
}

func setup(t testing.TB) *bundle {
	t.Helper()
	rdb := redistest.Start(t).Client(t)
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	client := asynq.NewClientFromRedisClient(rdb)
	notifier := &recordingNotifier{next: scheduler.NewNotifier(client, cat)}
	reg := prometheus.NewRegistry()
	h, err := api.New(api.Config{Store: st, Catalog: cat, Notifier: notifier, Enqueuer: client,
		Tokens: mustTokens(t, "other-token-xyz-0123,"+testToken), Registerer: reg})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &bundle{rdb: rdb, store: st, cat: cat, srv: srv, notifier: notifier, reg: reg,
		inspector: asynq.NewInspectorFromRedisClient(rdb)}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.body, &m), "body: %s", r.body)
	return m
}

func (r response) errorCode(t testing.TB) string {
	t.Helper()
	m := r.json(t)
	e, ok := m["error"].(map[string]any)
	require.True(t, ok, "no error envelope: %s", r.body)
	require.NotEmpty(t, e["message"])
	code, _ := e["code"].(string)
	return code
}

func (r response) data(t testing.TB) map[string]any {
	t.Helper()
	d, ok := r.json(t)["data"].(map[string]any)
	require.True(t, ok, "no data object: %s", r.body)
	return d
}

// req sends a request with the test token; hdr are "Key: value" pairs, and
// "Authorization:" (empty) drops the token.
func (b *bundle) req(t testing.TB, method, path, body string, hdr ...string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r, err := http.NewRequest(method, b.srv.URL+path, rd)
	require.NoError(t, err)
	r.Header.Set("Authorization", "Bearer "+testToken)
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for _, h := range hdr {
		k, v, _ := strings.Cut(h, ":")
		v = strings.TrimSpace(v)
		if v == "" {
			r.Header.Del(k)
		} else {
			r.Header.Set(k, v)
		}
	}
	resp, err := b.srv.Client().Do(r)
	require.NoError(t, err)
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return response{status: resp.StatusCode, header: resp.Header, body: out}
}

// snapshot digests every key and value of the test database (asynq's
// queues included), to show that a failed request wrote nothing.
func (b *bundle) snapshot(t testing.TB) string {
	t.Helper()
	ctx := context.Background()
	keys, err := b.rdb.Keys(ctx, "*").Result()
	require.NoError(t, err)
	sort.Strings(keys)
	h := sha256.New()
	for _, k := range keys {
		typ := b.rdb.Type(ctx, k).Val()
		fmt.Fprintf(h, "%s %s\n", k, typ)
		switch typ {
		case "string":
			fmt.Fprintln(h, b.rdb.Get(ctx, k).Val())
		case "hash":
			m := b.rdb.HGetAll(ctx, k).Val()
			for _, f := range slices.Sorted(mapsKeys(m)) {
				fmt.Fprintln(h, f, m[f])
			}
		case "zset":
			fmt.Fprintln(h, b.rdb.ZRangeWithScores(ctx, k, 0, -1).Val())
		case "list":
			fmt.Fprintln(h, b.rdb.LRange(ctx, k, 0, -1).Val())
		case "set":
			m := b.rdb.SMembers(ctx, k).Val()
			sort.Strings(m)
			fmt.Fprintln(h, m)
		case "stream":
			fmt.Fprintln(h, b.rdb.XRange(ctx, k, "-", "+").Val())
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

func mapsKeys(m map[string]string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func connPath(consumer, unifiedAPI, service string) string {
	return "/v1/consumers/" + consumer + "/connections/" + unifiedAPI + "/" + service
}

// integration returns the first catalog integration matching pred.
func (b *bundle) integration(t testing.TB, pred func(*catalog.Integration) bool) *catalog.Integration {
	t.Helper()
	for _, in := range b.cat.Integrations {
		if pred(in) {
			return in
		}
	}
	t.Fatal("no catalog integration fits the test")
	return nil
}

func TestAuth(t *testing.T) {
	t.Parallel()
	b := setup(t)
	pd := connPath("c1", "crm", "pipedrive")
	paths := map[string]string{
		"/v1/consumers/{consumer_id}/connections": "/v1/consumers/c1/connections",
		"/v1/connections":                         "/v1/connections",
		"/v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}":          pd,
		"/v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}/validate": pd + "/validate",
		"/v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}/refresh":  pd + "/refresh",
	}
	type tc struct{ method, path string }
	var cases []tc
	for _, rt := range api.Routes() {
		method, pattern, _ := strings.Cut(rt, " ")
		if !strings.HasPrefix(pattern, "/v1/") {
			continue
		}
		p, ok := paths[pattern]
		require.True(t, ok, "route %s has no test path", rt)
		cases = append(cases, tc{method, p})
	}
	require.Len(t, cases, 8)
	// Unknown routes and wrong methods under /v1 say nothing without a token.
	cases = append(cases, tc{"GET", "/v1/nope"}, tc{"POST", "/v1/connections"})

	before := b.snapshot(t)
	for _, c := range cases {
		body := ""
		if c.method == http.MethodPut || c.method == http.MethodPatch {
			body = `{"enabled":true,"credentials":{"api_key":"k"}}`
		}
		for name, auth := range map[string]string{
			"NoToken":     "Authorization:",
			"WrongToken":  "Authorization: Bearer wrong-token",
			"EmptyBearer": "Authorization: Bearer ",
			"Basic":       "Authorization: Basic " + testToken,
			"TokenPrefix": "Authorization: Bearer " + testToken[:10],
			"TokenSuffix": "Authorization: Bearer " + testToken + "x",
		} {
			r := b.req(t, c.method, c.path, body, auth)
			require.Equal(t, http.StatusUnauthorized, r.status, "%s %s %s: %s", name, c.method, c.path, r.body)
			require.Contains(t, r.header.Get("WWW-Authenticate"), "Bearer", name)
			require.Equal(t, "unauthorized", r.errorCode(t))
		}
	}
	require.Equal(t, before, b.snapshot(t), "a 401 wrote something")
	require.Zero(t, b.notifier.count())

	// Both configured tokens work; the document needs none.
	r := b.req(t, "GET", "/v1/consumers/c1/connections", "", "Authorization: Bearer other-token-xyz-0123")
	require.Equal(t, http.StatusOK, r.status)
	r = b.req(t, "GET", "/openapi.yaml", "", "Authorization:")
	require.Equal(t, http.StatusOK, r.status)
	require.Contains(t, string(r.body), "openapi: 3.0")
}

func TestNoAuthLoopbackOnly(t *testing.T) {
	t.Parallel()
	b := setup(t)
	h, err := api.New(api.Config{Store: b.store, Catalog: b.cat, Notifier: b.notifier,
		Enqueuer: asynq.NewClientFromRedisClient(b.rdb), AllowNoAuth: true})
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	r := httptest.NewRequest("GET", "/v1/connections", nil)
	r.RemoteAddr = "127.0.0.1:5555"
	h.ServeHTTP(rec, r)
	require.Equal(t, http.StatusOK, rec.Code)
	rec = httptest.NewRecorder()
	r.RemoteAddr = "10.1.2.3:5555"
	h.ServeHTTP(rec, r)
	require.Equal(t, http.StatusUnauthorized, rec.Code)

	_, err = api.New(api.Config{Store: b.store, Catalog: b.cat, Notifier: b.notifier,
		Enqueuer: asynq.NewClientFromRedisClient(b.rdb)})
	require.ErrorContains(t, err, "no API token")
}

func TestConsumerListingShowsAvailable(t *testing.T) {
	t.Parallel()
	b := setup(t)
	r := b.req(t, "PUT", connPath("acme-1", "crm", "pipedrive"), `{"credentials":{"api_key":"pd-key"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)

	r = b.req(t, "GET", "/v1/consumers/acme-1/connections", "")
	require.Equal(t, http.StatusOK, r.status)
	var out struct {
		Data []map[string]any `json:"data"`
	}
	require.NoError(t, json.Unmarshal(r.body, &out))
	require.Len(t, out.Data, len(b.cat.Integrations))
	seen := map[string]bool{}
	for _, c := range out.Data {
		id := c["id"].(string)
		seen[id] = true
		in, ok := b.cat.Get(c["service_id"].(string))
		require.True(t, ok)
		require.Equal(t, state.ConnectionID(in.UnifiedAPI, in.ID), id)
		require.Equal(t, in.Name, c["name"])
		require.Equal(t, string(in.AuthType), c["auth_type"])
		require.Equal(t, string(in.Status), c["status"])
		require.Equal(t, "acme-1", c["consumer_id"])
		if id == "crm+pipedrive" {
			require.Equal(t, "added", c["state"])
			require.Equal(t, true, c["enabled"])
			require.Equal(t, []any{"api_key"}, c["credentials"])
			continue
		}
		require.Equal(t, "available", c["state"], id)
		require.Equal(t, "ok", c["health"], id)
		require.Equal(t, false, c["enabled"], id)
		require.NotContains(t, c, "validation", "absent, never null: %s", id)
		require.Equal(t, float64(0), c["version"], id)
	}
	require.Len(t, seen, len(b.cat.Integrations))

	// A consumer nobody has seen has every integration available.
	r = b.req(t, "GET", "/v1/consumers/new-consumer/connections", "")
	require.Equal(t, http.StatusOK, r.status)
	require.NoError(t, json.Unmarshal(r.body, &out))
	require.Len(t, out.Data, len(b.cat.Integrations))
	for _, c := range out.Data {
		require.Equal(t, "available", c["state"])
	}
}

func TestConnectionLifecycle(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	p := connPath("c-life", "crm", "pipedrive")

	r := b.req(t, "PUT", p, `{"enabled":true,"credentials":{"api_key":"pd-secret"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	require.Equal(t, p, r.header.Get("Location"))
	d := r.data(t)
	require.Equal(t, "crm+pipedrive", d["id"])
	require.Equal(t, "added", d["state"])
	require.Equal(t, "ok", d["health"])
	require.Equal(t, "Pipedrive", d["name"])
	require.Equal(t, "api_key", d["auth_type"])
	require.Equal(t, "live", d["status"])
	require.NotContains(t, d, "validation", "absent before the first verdict, never null")
	require.NotContains(t, d, "token_expires_at", "token_expires_at is for OAuth only")
	version := int64(d["version"].(float64))
	require.Equal(t, fmt.Sprintf("%q", fmt.Sprint(version)), r.header.Get("ETag"))

	// The write notified, and the real notifier queued a critical validation.
	require.Equal(t, 1, b.notifier.count())
	require.Nil(t, b.notifier.last().Before)
	pending, err := b.inspector.ListPendingTasks(tasks.QueueCritical)
	require.NoError(t, err)
	require.Len(t, pending, 1)
	require.Equal(t, tasks.TypeValidate, pending[0].Type)

	// A valid verdict flips it to callable; the read derives health now.
	c, err := b.store.Get(ctx, state.Ref{ConsumerID: "c-life", ConnectionID: "crm+pipedrive"})
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(ctx, c.Ref(), c.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	r = b.req(t, "GET", p, "")
	require.Equal(t, http.StatusOK, r.status)
	d = r.data(t)
	require.Equal(t, "callable", d["state"])
	v := d["validation"].(map[string]any)
	require.Equal(t, "valid", v["verdict"])
	require.Equal(t, float64(200), v["http_status"])
	require.Equal(t, true, v["current"])
	etag := r.header.Get("ETag")

	// PATCH with the right If-Match disables; a stale one conflicts.
	r = b.req(t, "PATCH", p, `{"enabled":false}`, "If-Match: "+etag)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, false, r.data(t)["enabled"])
	require.Equal(t, "callable", r.data(t)["state"], "disabling keeps the state")
	require.Equal(t, 2, b.notifier.count())
	r = b.req(t, "PATCH", p, `{"enabled":true}`, "If-Match: "+etag)
	require.Equal(t, http.StatusConflict, r.status)
	require.Equal(t, "version_conflict", r.errorCode(t))

	// Validation of a disabled connection is refused.
	r = b.req(t, "POST", p+"/validate", "")
	require.Equal(t, http.StatusConflict, r.status)
	require.Equal(t, "connection_disabled", r.errorCode(t))

	// Enable (bare version in If-Match works too), then validate now twice.
	r = b.req(t, "GET", p, "")
	r = b.req(t, "PATCH", p, `{"enabled":true}`, "If-Match: "+strings.Trim(r.header.Get("ETag"), `"`))
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.req(t, "POST", p+"/validate", "")
	require.Equal(t, http.StatusAccepted, r.status, "%s", r.body)
	td := r.data(t)
	require.Equal(t, tasks.QueueCritical, td["queue"])
	require.Equal(t, false, td["already_queued"])
	taskID := td["task_id"].(string)
	info, err := b.inspector.GetTaskInfo(tasks.QueueCritical, taskID)
	require.NoError(t, err)
	require.Equal(t, tasks.TypeValidate, info.Type)
	r = b.req(t, "POST", p+"/validate", "")
	require.Equal(t, http.StatusAccepted, r.status)
	require.Equal(t, true, r.data(t)["already_queued"])
	require.Equal(t, taskID, r.data(t)["task_id"])

	// DELETE makes it available again.
	r = b.req(t, "DELETE", p, "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	d = r.data(t)
	require.Equal(t, "available", d["state"])
	require.Equal(t, false, d["enabled"])
	require.Nil(t, b.notifier.last().After)
	r = b.req(t, "GET", p, "")
	require.Equal(t, http.StatusNotFound, r.status)
	require.Equal(t, "not_found", r.errorCode(t))
}

func TestOAuthViewAndRefresh(t *testing.T) {
	t.Parallel()
	b := setup(t)
	xero := b.integration(t, func(in *catalog.Integration) bool { return in.ID == "xero" })
	p := connPath("c-oauth", xero.UnifiedAPI, xero.ID)
	exp := time.Now().Add(30 * time.Minute).UTC().Truncate(time.Second)
	r := b.req(t, "PUT", p, `{"credentials":{"access_token":"at-secret","refresh_token":"rt-secret","expires_at":"`+exp.Format(time.RFC3339)+`"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	d := r.data(t)
	require.Equal(t, "authorized", d["state"], "Xero without a tenant")
	require.Equal(t, "missing_settings", d["health"])
	require.Equal(t, exp.Format(time.RFC3339), d["token_expires_at"])
	require.Equal(t, []any{"access_token", "expires_at", "refresh_token"}, d["credentials"])

	r = b.req(t, "PATCH", p, `{"settings":{"tenant_id":"tenant-1"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, "callable", r.data(t)["state"])
	require.Equal(t, map[string]any{"tenant_id": "tenant-1"}, r.data(t)["settings"])

	r = b.req(t, "POST", p+"/refresh", "")
	require.Equal(t, http.StatusAccepted, r.status, "%s", r.body)
	info, err := b.inspector.GetTaskInfo(tasks.QueueCritical, r.data(t)["task_id"].(string))
	require.NoError(t, err)
	require.Equal(t, tasks.TypeRefreshToken, info.Type)
	require.NotContains(t, string(info.Payload), "secret")

	// An OAuth connection added without tokens has token_expires_at null.
	r = b.req(t, "PUT", connPath("c-oauth2", xero.UnifiedAPI, xero.ID), `{}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	d = r.data(t)
	require.Contains(t, d, "token_expires_at")
	require.Nil(t, d["token_expires_at"])
	require.Equal(t, "added", d["state"])
	r = b.req(t, "POST", connPath("c-oauth2", xero.UnifiedAPI, xero.ID)+"/refresh", "")
	require.Equal(t, http.StatusUnprocessableEntity, r.status)
	require.Equal(t, "no_refresh_token", r.errorCode(t))
}

func TestPutReplacesPatchMerges(t *testing.T) {
	t.Parallel()
	b := setup(t)
	p := connPath("c-merge", "ticketing", "zendesk")
	r := b.req(t, "PUT", p, `{"credentials":{"username":"u@example.com/token","password":"pw-1"},"settings":{"subdomain":"acme"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	require.Equal(t, []any{"password", "username"}, r.data(t)["credentials"])
	r = b.req(t, "PATCH", p, `{"credentials":{"password":""}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, []any{"username"}, r.data(t)["credentials"])
	require.Equal(t, "added", r.data(t)["state"])
	r = b.req(t, "PUT", p, `{"credentials":{"password":"pw-2"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, []any{"password"}, r.data(t)["credentials"], "PUT replaces the credentials")
	require.Equal(t, map[string]any{"subdomain": "acme"}, r.data(t)["settings"], "PUT keeps what it does not name")
}

func TestErrors(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	pd := connPath("c-err", "crm", "pipedrive")
	r := b.req(t, "PUT", pd, `{"credentials":{"api_key":"k1"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	_, err := b.store.Put(ctx, state.Ref{ConsumerID: "c-err", ConnectionID: "ticketing+freshdesk"},
		state.Input{Credentials: map[string]string{"api_key": "k"}, Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)
	disabled := false
	_, err = b.store.Put(ctx, state.Ref{ConsumerID: "c-err", ConnectionID: "ticketing+zendesk"},
		state.Input{Enabled: &disabled, Credentials: map[string]string{"username": "u", "password": "p"}}, 0)
	require.NoError(t, err)
	_, err = b.store.Put(ctx, state.Ref{ConsumerID: "c-err", ConnectionID: "hris+workday"}, state.Input{}, 0)
	require.NoError(t, err)
	_, err = b.store.Put(ctx, state.Ref{ConsumerID: "c-err", ConnectionID: "accounting+xero"},
		state.Input{Credentials: map[string]string{"access_token": "a", "refresh_token": "r"}}, 0)
	require.NoError(t, err)
	sf := connPath("c-err", "crm", "salesforce")
	big := `{"credentials":{"api_key":"` + strings.Repeat("a", 1<<20) + `"}}`

	cases := []struct {
		desc, method, path, body string
		hdr                      []string
		wantStatus               int
		wantCode                 string
	}{
		{"MalformedJSON", "PUT", pd, `{"enabled":`, nil, 400, "invalid_json"},
		{"SyntaxError", "PUT", pd, `{"enabled":tru}`, nil, 400, "invalid_json"},
		{"NotAnObject", "PUT", pd, `[1,2]`, nil, 400, "invalid_json"},
		{"TwoValues", "PUT", pd, `{"enabled":true}{"enabled":false}`, nil, 400, "invalid_json"},
		{"EmptyBody", "PATCH", pd, ``, []string{"Content-Type: application/json"}, 400, "invalid_json"},
		{"WrongTypeEnabled", "PATCH", pd, `{"enabled":"yes"}`, nil, 400, "invalid_field"},
		{"WrongTypeCredential", "PATCH", pd, `{"credentials":{"api_key":42}}`, nil, 400, "invalid_field"},
		{"WrongTypeSettings", "PATCH", pd, `{"settings":["a"]}`, nil, 400, "invalid_field"},
		{"UnknownField", "PUT", pd, `{"enabled":true,"state":"callable"}`, nil, 400, "invalid_field"},
		{"UnknownCredential", "PUT", pd, `{"credentials":{"password":"x"}}`, nil, 400, "invalid_field"},
		{"UnknownSetting", "PATCH", pd, `{"settings":{"region":"eu"}}`, nil, 400, "invalid_setting"},
		{"BadSettingValue", "PUT", connPath("c-err", "hris", "bamboohr"), `{"settings":{"subdomain":"a/b"}}`, nil, 400, "invalid_setting"},
		{"BadHostLabel", "PUT", connPath("c-err", "ticketing", "zendesk"), `{"settings":{"subdomain":"a.evil.com/x"}}`, nil, 422, "host_not_allowed"},
		{"BadExpiresAt", "PUT", connPath("c-err", "crm", "hubspot"), `{"credentials":{"access_token":"a","expires_at":"tomorrow"}}`, nil, 400, "invalid_field"},
		{"BadConsumerID", "GET", connPath("-bad", "crm", "pipedrive"), ``, nil, 400, "invalid_id"},
		{"BadConsumerIDList", "GET", "/v1/consumers/bad%20id/connections", ``, nil, 400, "invalid_id"},
		{"BadConsumerIDPut", "PUT", connPath("bad%2Fid", "crm", "pipedrive"), `{}`, nil, 400, "invalid_id"},
		{"BadServiceID", "GET", connPath("c-err", "crm", "Pipe.Drive"), ``, nil, 400, "invalid_id"},
		{"NotAdded", "GET", connPath("c-err", "crm", "hubspot"), ``, nil, 404, "not_found"},
		{"PatchNotAdded", "PATCH", connPath("c-err", "crm", "hubspot"), `{"enabled":true}`, nil, 404, "not_found"},
		{"DeleteNotAdded", "DELETE", connPath("c-err", "crm", "hubspot"), ``, nil, 404, "not_found"},
		{"ValidateNotAdded", "POST", connPath("c-err", "crm", "hubspot") + "/validate", ``, nil, 404, "not_found"},
		{"UnknownIntegration", "GET", connPath("c-err", "crm", "nosuch"), ``, nil, 404, "unknown_integration"},
		{"UnknownIntegrationPut", "PUT", connPath("c-err", "crm", "nosuch"), `{}`, nil, 404, "unknown_integration"},
		{"WrongUnifiedAPI", "PUT", connPath("c-err", "hris", "pipedrive"), `{}`, nil, 404, "unknown_integration"},
		{"UnknownRoute", "GET", "/v1/consumers/c-err/things", ``, nil, 404, "not_found"},
		{"VersionConflictPut", "PUT", pd, `{"enabled":false}`, []string{`If-Match: "1"`}, 409, "version_conflict"},
		{"VersionConflictPatch", "PATCH", pd, `{"enabled":false}`, []string{"If-Match: 7"}, 409, "version_conflict"},
		{"VersionConflictDelete", "DELETE", pd, ``, []string{`If-Match: "7"`}, 409, "version_conflict"},
		{"VersionConflictCreate", "PUT", connPath("c-err", "crm", "hubspot"), `{}`, []string{`If-Match: "7"`}, 409, "version_conflict"},
		{"MalformedIfMatch", "PATCH", pd, `{"enabled":false}`, []string{"If-Match: abc"}, 400, "invalid_if_match"},
		{"WeakIfMatch", "DELETE", pd, ``, []string{`If-Match: W/"1"`}, 400, "invalid_if_match"},
		{"StarIfMatch", "PUT", pd, `{}`, []string{`If-Match: *`}, 400, "invalid_if_match"},
		{"TooLarge", "PUT", pd, big, nil, 413, "payload_too_large"},
		{"TextPlain", "PUT", pd, `{"enabled":false}`, []string{"Content-Type: text/plain"}, 415, "unsupported_media_type"},
		{"NoContentType", "PATCH", pd, `{"enabled":false}`, []string{"Content-Type:"}, 415, "unsupported_media_type"},
		{"FormBody", "PATCH", pd, `enabled=false`, []string{"Content-Type: application/x-www-form-urlencoded"}, 415, "unsupported_media_type"},
		{"HostNotAllowed", "PUT", sf, `{"settings":{"instance_url":"https://evil.example.com"}}`, nil, 422, "host_not_allowed"},
		{"HostLoopback", "PUT", sf, `{"settings":{"instance_url":"https://127.0.0.1"}}`, nil, 422, "host_not_allowed"},
		{"HostMetadata", "PUT", sf, `{"settings":{"instance_url":"http://169.254.169.254"}}`, nil, 422, "host_not_allowed"},
		{"HostUserinfo", "PUT", sf, `{"settings":{"instance_url":"https://x:y@acme.my.salesforce.com"}}`, nil, 422, "host_not_allowed"},
		{"SettingOfAnotherIntegration", "PATCH", pd, `{"settings":{"instance_url":"https://evil.example.com"}}`, nil, 400, "invalid_setting"},
		{"RefreshNotOAuth", "POST", pd + "/refresh", ``, nil, 422, "not_oauth"},
		{"ValidateNotCheckable", "POST", connPath("c-err", "ticketing", "freshdesk") + "/validate", ``, nil, 422, "integration_not_checkable"},
		{"ValidateNoCredentials", "POST", connPath("c-err", "hris", "workday") + "/validate", ``, nil, 422, "incomplete_connection"},
		{"ValidateMissingSetting", "POST", connPath("c-err", "accounting", "xero") + "/validate", ``, nil, 422, "incomplete_connection"},
		{"ValidateDisabled", "POST", connPath("c-err", "ticketing", "zendesk") + "/validate", ``, nil, 409, "connection_disabled"},
		{"ListBadState", "GET", "/v1/connections?state=broken", ``, nil, 400, "invalid_query"},
		{"ListAvailable", "GET", "/v1/connections?state=available", ``, nil, 400, "invalid_query"},
		{"ListLimitZero", "GET", "/v1/connections?limit=0", ``, nil, 400, "invalid_query"},
		{"ListLimitHuge", "GET", "/v1/connections?limit=100000", ``, nil, 400, "invalid_query"},
		{"ListLimitText", "GET", "/v1/connections?limit=ten", ``, nil, 400, "invalid_query"},
		{"ListBadCursor", "GET", "/v1/connections?cursor=garbage", ``, nil, 400, "invalid_query"},
		{"ListUnknownParam", "GET", "/v1/connections?status=live", ``, nil, 400, "invalid_query"},
		{"ListRepeatedParam", "GET", "/v1/connections?state=added&state=invalid", ``, nil, 400, "invalid_query"},
		{"ListBadService", "GET", "/v1/connections?service_id=A%20B", ``, nil, 400, "invalid_query"},
		{"MethodNotAllowed", "POST", "/v1/connections", `{}`, nil, 405, "method_not_allowed"},
		{"MethodNotAllowedConn", "POST", pd, `{}`, nil, 405, "method_not_allowed"},
	}
	for _, c := range cases {
		t.Run(c.desc, func(t *testing.T) {
			before := b.snapshot(t)
			notified := b.notifier.count()
			r := b.req(t, c.method, c.path, c.body, c.hdr...)
			require.Equal(t, c.wantStatus, r.status, "%s", truncate(r.body))
			require.Equal(t, c.wantCode, r.errorCode(t), "%s", r.body)
			require.Equal(t, "application/json", r.header.Get("Content-Type"))
			require.Equal(t, before, b.snapshot(t), "the failed request wrote something")
			require.Equal(t, notified, b.notifier.count(), "a failed request notified")
			if c.wantStatus == 405 {
				require.NotEmpty(t, r.header.Get("Allow"))
			}
		})
	}
}

func truncate(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "..."
	}
	return string(b)
}

func TestCredentialsNeverInResponses(t *testing.T) {
	t.Parallel()
	b := setup(t)
	secretsSent := []string{"SECRET-api-key-1111", "SECRET-user-2222", "SECRET-pass-3333",
		"SECRET-access-4444", "SECRET-refresh-5555", "SECRET-wrong-6666", "SECRET-field-7777"}
	var bodies [][]byte
	collect := func(r response) { bodies = append(bodies, r.body) }
	exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)

	collect(b.req(t, "PUT", connPath("c-sec", "crm", "pipedrive"), `{"credentials":{"api_key":"SECRET-api-key-1111"}}`))
	collect(b.req(t, "PUT", connPath("c-sec", "ticketing", "zendesk"),
		`{"credentials":{"username":"SECRET-user-2222","password":"SECRET-pass-3333"},"settings":{"subdomain":"acme"}}`))
	collect(b.req(t, "PUT", connPath("c-sec", "crm", "hubspot"),
		`{"credentials":{"access_token":"SECRET-access-4444","refresh_token":"SECRET-refresh-5555","expires_at":"`+exp+`"}}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"enabled":false}`))
	// Secrets in the wrong places must not be echoed by error messages.
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"credentials":{"SECRET-field-7777":"SECRET-wrong-6666"}}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"credentials":{"api_key":["SECRET-wrong-6666"]}}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"SECRET-field-7777":"SECRET-wrong-6666"}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"credentials":{"api_key":SECRET-wrong-6666}}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "pipedrive"), `{"settings":{"SECRET-field-7777":"x"}}`))
	collect(b.req(t, "PUT", connPath("c-sec", "crm", "salesforce"), `{"settings":{"instance_url":"https://SECRET-user-2222:SECRET-pass-3333@acme.my.salesforce.com"}}`))
	collect(b.req(t, "PATCH", connPath("c-sec", "crm", "hubspot"), `{"credentials":{"expires_at":"SECRET-wrong-6666"}}`))

	collect(b.req(t, "GET", "/v1/consumers/c-sec/connections", ""))
	collect(b.req(t, "GET", "/v1/connections", ""))
	collect(b.req(t, "GET", "/v1/connections?service_id=hubspot", ""))
	for _, p := range []string{connPath("c-sec", "crm", "pipedrive"), connPath("c-sec", "ticketing", "zendesk"), connPath("c-sec", "crm", "hubspot")} {
		collect(b.req(t, "GET", p, ""))
		collect(b.req(t, "POST", p+"/validate", ""))
		collect(b.req(t, "POST", p+"/refresh", ""))
	}
	collect(b.req(t, "DELETE", connPath("c-sec", "crm", "hubspot"), ""))

	for _, body := range bodies {
		for _, s := range secretsSent {
			require.NotContains(t, string(body), s)
		}
		require.NotContains(t, string(body), "SECRET")
	}
	// The credentials are really stored (the test is not vacuous).
	c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "c-sec", ConnectionID: "ticketing+zendesk"})
	require.NoError(t, err)
	require.Equal(t, "SECRET-pass-3333", c.Credentials.Password)
	// Nor in task payloads (the Asynq monitor shows them).
	for _, q := range []string{tasks.QueueCritical, tasks.QueueDefault} {
		ts, err := b.inspector.ListPendingTasks(q)
		if err != nil {
			continue
		}
		for _, ti := range ts {
			require.NotContains(t, string(ti.Payload), "SECRET")
		}
	}
}

func TestPaginationWhileWriting(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	const n = 1000
	services := []string{"crm+pipedrive", "ticketing+zendesk", "crm+hubspot"}
	want := map[string]bool{}
	for i := range n {
		ref := state.Ref{ConsumerID: fmt.Sprintf("page-%04d", i), ConnectionID: services[i%len(services)]}
		in := state.Input{}
		switch ref.ConnectionID {
		case "crm+pipedrive":
			in.Credentials = map[string]string{"api_key": "k"}
		case "ticketing+zendesk":
			in.Settings = map[string]string{"subdomain": "acme"}
		}
		_, err := b.store.Put(ctx, ref, in, 0)
		require.NoError(t, err)
		want[ref.String()] = true
	}

	// A writer changes existing connections (state and index moves) and
	// adds and deletes others while the walk runs.
	stop := make(chan struct{})
	var writes atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ref := state.Ref{ConsumerID: fmt.Sprintf("page-%04d", (i*7)%n), ConnectionID: services[((i*7)%n)%len(services)]}
			en := i%2 == 0
			var err error
			switch i % 4 {
			case 0, 1:
				_, err = b.store.Patch(ctx, ref, state.Input{Enabled: &en}, 0)
			case 2:
				if ref.ConnectionID == "crm+pipedrive" {
					_, err = b.store.Patch(ctx, ref, state.Input{Credentials: map[string]string{"api_key": fmt.Sprint("k", i)}}, 0)
				}
			case 3:
				extra := state.Ref{ConsumerID: fmt.Sprintf("extra-%04d", i%50), ConnectionID: "crm+pipedrive"}
				if i%8 == 3 {
					_, err = b.store.Put(ctx, extra, state.Input{}, 0)
				} else {
					_, err = b.store.Delete(ctx, extra, 0)
					if errors.Is(err, state.ErrNotFound) {
						err = nil
					}
				}
			}
			if err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			writes.Add(1)
		}
	})

	walk := func(query string) map[string]int {
		seen := map[string]int{}
		cursor := ""
		for pages := 0; ; pages++ {
			require.Less(t, pages, 500)
			path := "/v1/connections?limit=37" + query
			if cursor != "" {
				path += "&cursor=" + cursor
			}
			r := b.req(t, "GET", path, "")
			require.Equal(t, http.StatusOK, r.status, "%s", r.body)
			var out struct {
				Data []struct {
					ID         string `json:"id"`
					ConsumerID string `json:"consumer_id"`
				} `json:"data"`
				Meta struct {
					NextCursor *string `json:"next_cursor"`
				} `json:"meta"`
			}
			require.NoError(t, json.Unmarshal(r.body, &out))
			for _, c := range out.Data {
				seen[c.ConsumerID+"|"+c.ID]++
			}
			if out.Meta.NextCursor == nil {
				return seen
			}
			cursor = *out.Meta.NextCursor
		}
	}
	seen := walk("")
	seenPD := walk("&service_id=pipedrive")
	close(stop)
	wg.Wait()
	require.Positive(t, writes.Load())
	t.Logf("walked %d connections while %d writes happened", len(seen), writes.Load())

	for k, c := range seen {
		require.Equal(t, 1, c, "%s seen %d times", k, c)
	}
	for k := range want {
		require.Equal(t, 1, seen[k], "%s missing", k)
	}
	for k, c := range seenPD {
		require.Equal(t, 1, c, "%s seen %d times", k, c)
		require.True(t, strings.HasSuffix(k, "|crm+pipedrive"), k)
	}
	for k := range want {
		if strings.HasSuffix(k, "|crm+pipedrive") {
			require.Equal(t, 1, seenPD[k], "%s missing from the filtered walk", k)
		}
	}
}

func TestListFilters(t *testing.T) {
	t.Parallel()
	b := setup(t)
	require.Equal(t, http.StatusCreated, b.req(t, "PUT", connPath("f1", "crm", "pipedrive"), `{"credentials":{"api_key":"k"}}`).status)
	require.Equal(t, http.StatusCreated, b.req(t, "PUT", connPath("f2", "crm", "pipedrive"), `{}`).status)
	require.Equal(t, http.StatusCreated, b.req(t, "PUT", connPath("f3", "ticketing", "zendesk"), `{}`).status)
	c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "f1", ConnectionID: "crm+pipedrive"})
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(context.Background(), c.Ref(), c.Revision, state.Verdict{Outcome: state.OutcomeValid})
	require.NoError(t, err)

	ids := func(q string) []string {
		r := b.req(t, "GET", "/v1/connections"+q, "")
		require.Equal(t, http.StatusOK, r.status, "%s", r.body)
		var out struct {
			Data []map[string]any `json:"data"`
			Meta map[string]any   `json:"meta"`
		}
		require.NoError(t, json.Unmarshal(r.body, &out))
		require.Contains(t, out.Meta, "next_cursor")
		var got []string
		for _, d := range out.Data {
			got = append(got, d["consumer_id"].(string)+"|"+d["id"].(string))
		}
		sort.Strings(got)
		return got
	}
	require.Equal(t, []string{"f1|crm+pipedrive", "f2|crm+pipedrive", "f3|ticketing+zendesk"}, ids(""))
	require.Equal(t, []string{"f1|crm+pipedrive"}, ids("?state=callable"))
	require.Equal(t, []string{"f2|crm+pipedrive", "f3|ticketing+zendesk"}, ids("?state=added"))
	require.Equal(t, []string{"f3|ticketing+zendesk"}, ids("?unified_api=ticketing"))
	require.Equal(t, []string{"f2|crm+pipedrive"}, ids("?service_id=pipedrive&state=added"))
	require.Empty(t, ids("?service_id=hubspot"))
}

func TestMetricsUseRoutePatterns(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.req(t, "GET", connPath("metrics-consumer-42", "crm", "pipedrive"), "")
	b.req(t, "GET", "/v1/consumers/metrics-consumer-42/connections", "")
	b.req(t, "GET", "/v1/consumers/metrics-consumer-42/connections", "", "Authorization:")
	b.req(t, "GET", "/v1/nowhere/metrics-consumer-42", "")
	mfs, err := b.reg.Gather()
	require.NoError(t, err)
	found := map[string]bool{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
				require.NotContains(t, l.GetValue(), "metrics-consumer-42")
			}
			if mf.GetName() == "vaultfleet_http_requests_total" {
				found[labels["route"]+" "+labels["method"]+" "+labels["code"]] = true
			}
		}
	}
	require.True(t, found["/v1/consumers/{consumer_id}/connections/{unified_api}/{service_id} GET 404"], "%v", found)
	require.True(t, found["/v1/consumers/{consumer_id}/connections GET 200"], "%v", found)
	require.True(t, found["/v1/consumers/{consumer_id}/connections GET 401"], "%v", found)
	require.True(t, found["unmatched GET 404"], "%v", found)
}

func TestNotifyFailureIsLoggedNotReturned(t *testing.T) {
	t.Parallel()
	b := setup(t)
	h, err := api.New(api.Config{Store: b.store, Catalog: b.cat, Notifier: failingNotifier{},
		Enqueuer: asynq.NewClientFromRedisClient(b.rdb), Tokens: mustTokens(t, testToken)})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	defer srv.Close()
	r, err := http.NewRequest("PUT", srv.URL+connPath("c-nf", "crm", "pipedrive"), bytes.NewBufferString(`{"credentials":{"api_key":"k"}}`))
	require.NoError(t, err)
	r.Header.Set("Authorization", "Bearer "+testToken)
	r.Header.Set("Content-Type", "application/json")
	resp, err := srv.Client().Do(r)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusCreated, resp.StatusCode)
	_, err = b.store.Get(context.Background(), state.Ref{ConsumerID: "c-nf", ConnectionID: "crm+pipedrive"})
	require.NoError(t, err)
}

type failingNotifier struct{}

func (failingNotifier) Notify(context.Context, state.Change) error {
	return fmt.Errorf("redis down")
}
