package api_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
)

// serveStore is the API over a store opened with the keyring spec on rdb;
// enq, if not nil, replaces the asynq client on rdb.
func serveStore(t *testing.T, rdb *redis.Client, spec string, enq api.Enqueuer) *bundle {
	t.Helper()
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(spec)
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	client := asynq.NewClientFromRedisClient(rdb)
	if enq == nil {
		enq = client
	}
	notifier := &recordingNotifier{next: scheduler.NewNotifier(client, cat)}
	h, err := api.New(api.Config{Store: st, Catalog: cat, Notifier: notifier, Enqueuer: enq,
		Tokens: mustTokens(t, testToken), Registerer: prometheus.NewRegistry()})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &bundle{rdb: rdb, store: st, cat: cat, srv: srv, notifier: notifier}
}

// findView returns the view of connection id in a listing body.
func findView(t *testing.T, r response, id string) map[string]any {
	t.Helper()
	list, ok := r.json(t)["data"].([]any)
	require.True(t, ok, "%s", r.body)
	for _, v := range list {
		m := v.(map[string]any)
		if m["id"] == id && m["version"].(float64) > 0 {
			return m
		}
	}
	t.Fatalf("%s not listed: %s", id, r.body)
	return nil
}

// TestKeyRotationOverTheAPI: records written under k1 are served by a
// `serve` that holds k2 only. Without a reseal nothing answers 500: the
// listings and GET show the records marked credentials_unreadable, PUT
// with new credentials and DELETE work, and what needs the old value
// answers 409 with a way out. After a reseal everything is readable.
func TestKeyRotationOverTheAPI(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	k1, k2 := secrets.NewKey("k1"), secrets.NewKey("k2")
	old := serveStore(t, rdb, k1, nil)
	const secret = "old-api-key-0123456789"
	for _, c := range []string{"rot-a", "rot-b", "rot-c", "rot-d"} {
		require.Equal(t, http.StatusCreated,
			old.req(t, "PUT", connPath(c, "crm", "pipedrive"), `{"credentials":{"api_key":"`+secret+`"}}`).status)
	}
	require.Equal(t, http.StatusCreated, old.req(t, "PUT", connPath("rot-a", "hris", "bamboohr"),
		`{"credentials":{"api_key":"`+secret+`"},"settings":{"subdomain":"acme"}}`).status)

	b := serveStore(t, rdb, k2, nil)
	var statuses []int
	do := func(method, path, body string) response {
		r := b.req(t, method, path, body)
		statuses = append(statuses, r.status)
		require.NotContains(t, string(r.body), secret)
		return r
	}

	r := do("GET", "/v1/consumers/rot-a/connections", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	v := findView(t, r, "crm+pipedrive")
	require.Equal(t, true, v["credentials_unreadable"])
	require.Equal(t, "added", v["state"], "the stored state")
	require.Empty(t, v["credentials"])
	require.Equal(t, true, findView(t, r, "hris+bamboohr")["credentials_unreadable"])

	r = do("GET", "/v1/connections?limit=2", "")
	require.Equal(t, http.StatusOK, r.status, "the first page of the fleet listing: %s", r.body)
	for _, item := range r.json(t)["data"].([]any) {
		require.Equal(t, true, item.(map[string]any)["credentials_unreadable"])
	}

	path := connPath("rot-a", "crm", "pipedrive")
	r = do("GET", path, "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, true, r.data(t)["credentials_unreadable"])
	require.NotEmpty(t, r.header.Get("ETag"))

	for _, tc := range []struct{ method, path, body string }{
		{"PATCH", path, `{"enabled":false}`},
		{"PATCH", path, `{"credentials":{"api_key":"merge-me"}}`},
		{"PUT", path, `{"enabled":true}`},
		{"POST", path + "/validate", ""},
		{"POST", connPath("rot-a", "hris", "bamboohr") + "/validate", ""},
	} {
		r = do(tc.method, tc.path, tc.body)
		require.Equal(t, http.StatusConflict, r.status, "%s %s: %s", tc.method, tc.path, r.body)
		require.Equal(t, "credentials_unreadable", r.errorCode(t))
		msg := r.json(t)["error"].(map[string]any)["message"].(string)
		require.Contains(t, msg, `"k1"`)
		require.Contains(t, msg, "PUT")
	}

	// PUT with new credentials replaces them without the old value.
	r = do("PUT", path, `{"credentials":{"api_key":"new-key-after-rotation"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.NotContains(t, r.data(t), "credentials_unreadable")
	require.Equal(t, []any{"api_key"}, r.data(t)["credentials"])
	got, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "rot-a", ConnectionID: "crm+pipedrive"})
	require.NoError(t, err)
	require.Equal(t, "new-key-after-rotation", got.Credentials.APIKey)
	require.Equal(t, http.StatusAccepted, do("POST", path+"/validate", "").status)

	// DELETE works without the old value.
	r = do("DELETE", connPath("rot-b", "crm", "pipedrive"), "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, http.StatusNotFound, do("GET", connPath("rot-b", "crm", "pipedrive"), "").status)

	for _, s := range statuses {
		require.Less(t, s, 500, "nothing answers 5xx: %v", statuses)
	}

	// Reseal with new,old; then new only reads everything.
	rotated, err := secrets.ParseKeyring(k2 + "," + k1)
	require.NoError(t, err)
	cat, err := catalog.Default()
	require.NoError(t, err)
	rs, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: rotated})
	require.NoError(t, err)
	p, err := rs.ResealAll(context.Background(), nil)
	require.NoError(t, err)
	require.Equal(t, 3, p.Resealed, "rot-a bamboohr, rot-c, rot-d")
	r = do("GET", "/v1/connections", "")
	require.Equal(t, http.StatusOK, r.status)
	items := r.json(t)["data"].([]any)
	require.Len(t, items, 4)
	for _, item := range items {
		m := item.(map[string]any)
		require.NotContains(t, m, "credentials_unreadable", "%v", m)
		require.Equal(t, []any{"api_key"}, m["credentials"])
	}
	r = do("PATCH", connPath("rot-c", "crm", "pipedrive"), `{"enabled":false}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
}

// contentionHook bumps a record's version right before every write
// script, so that each compare-and-set loses as under a storm of
// concurrent writes of that connection.
type contentionHook struct{ other *redis.Client }

func (h contentionHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h contentionHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h contentionHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if name := cmd.Name(); (name == "evalsha" || name == "eval") && len(cmd.Args()) > 3 {
			if key, ok := cmd.Args()[3].(string); ok && strings.Contains(key, ":conn:") {
				h.other.HIncrBy(ctx, key, "v", 1)
			}
		}
		return next(ctx, cmd)
	}
}

// TestServiceUnavailableAnswers503: write contention, a failed enqueue and
// a stopped Redis answer 503 with Retry-After in the error envelope.
func TestServiceUnavailableAnswers503(t *testing.T) {
	t.Parallel()
	check := func(t *testing.T, r response, code string) {
		t.Helper()
		require.Equal(t, http.StatusServiceUnavailable, r.status, "%s", r.body)
		require.Equal(t, code, r.errorCode(t))
		require.NotEmpty(t, r.header.Get("Retry-After"))
	}
	t.Run("Contention", func(t *testing.T) {
		t.Parallel()
		srv := redistest.Start(t)
		rdb := srv.Client(t)
		b := serveStore(t, rdb, secrets.NewKey("k1"), nil)
		path := connPath("busy", "crm", "pipedrive")
		require.Equal(t, http.StatusCreated, b.req(t, "PUT", path, `{"credentials":{"api_key":"a"}}`).status)
		rdb.AddHook(contentionHook{other: redis.NewClient(&redis.Options{Addr: srv.Addr, DB: rdb.Options().DB})})
		r := b.req(t, "PUT", path, `{"credentials":{"api_key":"b"}}`)
		check(t, r, "write_contention")
		require.Equal(t, "1", r.header.Get("Retry-After"))
	})
	t.Run("EnqueueFails", func(t *testing.T) {
		t.Parallel()
		rdb := redistest.Start(t).Client(t)
		dead := asynq.NewClient(asynq.RedisClientOpt{Addr: "127.0.0.1:1"})
		t.Cleanup(func() { _ = dead.Close() })
		b := serveStore(t, rdb, secrets.NewKey("k1"), dead)
		path := connPath("enq", "crm", "pipedrive")
		require.Equal(t, http.StatusCreated, b.req(t, "PUT", path, `{"credentials":{"api_key":"a"}}`).status)
		check(t, b.req(t, "POST", path+"/validate", ""), "enqueue_failed")
	})
	t.Run("RedisStopped", func(t *testing.T) {
		t.Parallel()
		srv := redistest.New(t)
		if !srv.Real {
			t.Skip("needs redis-server")
		}
		rdb := redis.NewClient(&redis.Options{Addr: srv.Addr, MaxRetries: 1})
		t.Cleanup(func() { _ = rdb.Close() })
		b := serveStore(t, rdb, secrets.NewKey("k1"), nil)
		path := connPath("down", "hris", "bamboohr")
		require.Equal(t, http.StatusCreated,
			b.req(t, "PUT", path, `{"credentials":{"api_key":"a"},"settings":{"subdomain":"acme"}}`).status)
		srv.Stop()
		for _, tc := range []struct{ method, path, body string }{
			{"POST", path + "/validate", ""},
			{"POST", path + "/refresh", ""},
			{"GET", path, ""},
			{"PUT", path, `{"credentials":{"api_key":"b"}}`},
			{"DELETE", path, ""},
			{"GET", "/v1/consumers/down/connections", ""},
			{"GET", "/v1/connections", ""},
		} {
			r := b.req(t, tc.method, tc.path, tc.body)
			check(t, r, "unavailable")
			require.Equal(t, "5", r.header.Get("Retry-After"), "%s %s", tc.method, tc.path)
		}
	})
}
