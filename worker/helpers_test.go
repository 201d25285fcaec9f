package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Secrets the tests hand out; none may ever show in a log or a result.
const (
	secretAPIKey   = "sk_live_SECRET_api_key_123"
	secretAccess   = "at_SECRET_access_0"
	secretRefresh  = "rt_SECRET_refresh_0"
	secretPassword = "pw_SECRET_password"
	clientID       = "client-id-1"
	clientSecret   = "cs_SECRET_client_secret"
)

const consumer = "consumer-1"

// provider is a fake integration API: per-path handlers that can be
// swapped while the test runs, and request counts per path.
type provider struct {
	srv  *httptest.Server
	host string

	mu       sync.Mutex
	handlers map[string]http.HandlerFunc
	counts   map[string]int
	arrivals []time.Time
}

func newProvider(t testing.TB) *provider {
	p := &provider{handlers: map[string]http.HandlerFunc{}, counts: map[string]int{}}
	p.srv = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.counts[r.URL.Path]++
		p.arrivals = append(p.arrivals, time.Now())
		h := p.handlers[r.URL.Path]
		p.mu.Unlock()
		if h == nil {
			http.NotFound(rw, r)
			return
		}
		h(rw, r)
	}))
	t.Cleanup(p.srv.Close)
	p.host = strings.TrimPrefix(p.srv.URL, "http://")
	return p
}

func (p *provider) handle(path string, h http.HandlerFunc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.handlers[path] = h
}

func (p *provider) count(path string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.counts[path]
}

func (p *provider) total() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, c := range p.counts {
		n += c
	}
	return n
}

func status(code int) http.HandlerFunc {
	return func(rw http.ResponseWriter, _ *http.Request) { rw.WriteHeader(code) }
}

func jsonBody(code int, body string) http.HandlerFunc {
	return func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "application/json")
		rw.WriteHeader(code)
		_, _ = rw.Write([]byte(body))
	}
}

// requireHeader answers 200 when the request carries the header value,
// 401 otherwise.
func requireHeader(name, value string) http.HandlerFunc {
	return func(rw http.ResponseWriter, r *http.Request) {
		if r.Header.Get(name) != value {
			rw.WriteHeader(http.StatusUnauthorized)
			return
		}
		_, _ = rw.Write([]byte(`{"ok":true}`))
	}
}

// catalogYAML is the test catalog; HOST is the provider, BAD another
// listener the worker must never reach.
const catalogYAML = `
integrations:
  - id: acme
    name: Acme
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/acme/me
      auth: {scheme: header, name: X-Api-Token, field: api_key, prefix: "Token "}
      invalid_statuses: [401, 403, 404]
      timeout: 1s
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: only401
    name: Only401
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/only401/me
      invalid_statuses: [401]
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: zen
    name: Zen
    unified_api: ticketing
    auth_type: basic
    status: live
    credential_fields: [username, password]
    check:
      url: http://HOST/zen/users/me.json
      assert: {path: user.id, not_null: true}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: bamboo
    name: Bamboo
    unified_api: hris
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings:
      - {name: subdomain, type: text, required: true}
    check:
      url: http://HOST/bamboo/{subdomain}/meta
      auth: {scheme: basic, username: api_key, password: "literal:x"}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: qkey
    name: QKey
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/qkey/me
      auth: {scheme: query, name: api_token, field: api_key}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: inst
    name: Inst
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings:
      - {name: instance_url, type: url, required: true}
    check:
      url: "{instance_url}/inst/me"
    allow_http: true
    allowed_hosts: ["HOST"INSTHOSTS]
  - id: oco
    name: OCo
    unified_api: accounting
    auth_type: oauth2
    status: live
    check:
      url: http://HOST/oco/me
    oauth:
      token_url: http://HOST/oco/token
      client_id_env: OCO_CLIENT_ID
      client_secret_env: OCO_CLIENT_SECRET
      auth_style: header
    token_lifetime: 1h
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: owave
    name: OWave
    unified_api: accounting
    auth_type: oauth2
    status: live
    check:
      url: http://HOST/owave/me
    oauth:
      token_url: http://HOST/owave/token
      client_id_env: OCO_CLIENT_ID
      client_secret_env: OCO_CLIENT_SECRET
      auth_style: header
    token_lifetime: 1h
    invalid_wave: {threshold: 1, window: 1m}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: limited
    name: Limited
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/limited/me
    rate_limit: {requests: 10, per: 1s}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: confirmco
    name: ConfirmCo
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/confirmco/me
    confirm_invalid: 1
    confirm_spacing: 1s
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: waveco
    name: WaveCo
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/waveco/me
    invalid_wave: {threshold: 2, window: 1m}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: waveconfirm
    name: WaveConfirm
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/waveconfirm/me
    confirm_invalid: 1
    confirm_spacing: 1h
    invalid_wave: {threshold: 1, window: 1m}
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: devco
    name: DevCo
    unified_api: crm
    auth_type: api_key
    status: development
    credential_fields: [api_key]
    check:
      url: http://HOST/devco/me
    allow_http: true
    allowed_hosts: ["HOST"]
`

// testCatalog parses the test catalog for a provider host; instHosts are
// more hosts the inst integration allows.
func testCatalog(t testing.TB, host string, instHosts ...string) *catalog.Catalog {
	t.Helper()
	extra := ""
	for _, h := range instHosts {
		extra += `, "` + h + `"`
	}
	y := strings.ReplaceAll(catalogYAML, "INSTHOSTS", extra)
	y = strings.ReplaceAll(y, "HOST", host)
	cat, err := catalog.Parse([]byte(y))
	require.NoError(t, err)
	return cat
}

func testEnv(name string) string {
	switch name {
	case "OCO_CLIENT_ID":
		return clientID
	case "OCO_CLIENT_SECRET":
		return clientSecret
	}
	return ""
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// bundle is what an integration test works with.
type bundle struct {
	t     testing.TB
	rdb   *redis.Client
	p     *provider
	cat   *catalog.Catalog
	store *state.Store
	logs  *syncBuffer
}

func setup(t testing.TB) *bundle {
	t.Helper()
	b := &bundle{t: t, logs: &syncBuffer{}}
	b.rdb = redistest.Start(t).Client(t)
	b.p = newProvider(t)
	b.cat = testCatalog(t, b.p.host)
	b.store = b.newStore(b.cat)
	return b
}

func (b *bundle) newStore(cat *catalog.Catalog) *state.Store {
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(b.t, err)
	st, err := state.New(state.Config{Client: b.rdb, Catalog: cat, Keys: keys})
	require.NoError(b.t, err)
	return st
}

// config is the worker configuration of the tests: short polls and
// backoff so retries show within a test.
func (b *bundle) config() Config {
	return Config{
		Store:          b.store,
		Catalog:        b.cat,
		Redis:          b.rdb,
		Concurrency:    10,
		PollInterval:   100 * time.Millisecond,
		RetryBaseDelay: 100 * time.Millisecond,
		RetryMaxDelay:  time.Second,
		Getenv:         testEnv,
		Logger:         slog.New(slog.NewJSONHandler(b.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer:     prometheus.NewRegistry(),
	}
}

func (b *bundle) worker(mod ...func(*Config)) *Worker {
	b.t.Helper()
	cfg := b.config()
	for _, m := range mod {
		m(&cfg)
	}
	w, err := New(cfg)
	require.NoError(b.t, err)
	return w
}

// start runs w until the test ends (or the returned stop is called).
func (b *bundle) start(w *Worker) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			require.NoError(b.t, <-done)
		})
	}
	b.t.Cleanup(stop)
	return stop
}

func (b *bundle) put(id string, creds, settings map[string]string) *state.Connection {
	b.t.Helper()
	ch, err := b.store.Put(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: id},
		state.Input{Credentials: creds, Settings: settings}, 0)
	require.NoError(b.t, err)
	return ch.After
}

func (b *bundle) get(id string) *state.Connection {
	b.t.Helper()
	c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: id})
	require.NoError(b.t, err)
	return c
}

func validateTask(t testing.TB, id string) *asynq.Task {
	t.Helper()
	task, err := tasks.NewValidateTask(consumer, id, tasks.ReasonOnDemand, "")
	require.NoError(t, err)
	return task
}

func refreshTask(t testing.TB, id string, reason tasks.Reason, key string) *asynq.Task {
	t.Helper()
	task, err := tasks.NewRefreshTask(consumer, id, reason, key)
	require.NoError(t, err)
	return task
}

// process runs one task through the worker's handler (middleware
// included), without a server.
func process(t testing.TB, w *Worker, task *asynq.Task) error {
	t.Helper()
	return w.Handler().ProcessTask(context.Background(), task)
}

func (b *bundle) enqueue(task *asynq.Task, opts ...asynq.Option) *asynq.TaskInfo {
	b.t.Helper()
	c := asynq.NewClientFromRedisClient(b.rdb)
	info, err := c.Enqueue(task, opts...)
	require.NoError(b.t, err)
	return info
}

// awaitTask waits up to d for the task of info to reach state st and
// returns it as the inspector shows it.
func (b *bundle) awaitTask(info *asynq.TaskInfo, st asynq.TaskState, d time.Duration) *asynq.TaskInfo {
	b.t.Helper()
	ins := b.inspector()
	var ti *asynq.TaskInfo
	eventually(b.t, d, func() bool {
		var err error
		ti, err = ins.GetTaskInfo(info.Queue, info.ID)
		return err == nil && ti.State == st
	}, "task %s %s", info.ID, st)
	return ti
}

func (b *bundle) inspector() *asynq.Inspector {
	return asynq.NewInspectorFromRedisClient(b.rdb)
}

// eventually polls cond every 20ms for up to d.
func eventually(t testing.TB, d time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	require.Failf(t, "condition not met in time", msg, args...)
}

// requireNoSecrets fails if any test secret shows in s. Every secret the
// tests and their providers hand out has "_SECRET_" in it (the names of
// environment variables such as OCO_CLIENT_SECRET are no secret).
func requireNoSecrets(t testing.TB, s string) {
	t.Helper()
	for _, sec := range []string{secretAPIKey, secretAccess, secretRefresh, secretPassword, clientSecret,
		"_SECRET_"} {
		require.NotContains(t, s, sec)
	}
}

func decodeResult(t testing.TB, b []byte) Result {
	t.Helper()
	var r Result
	require.NoError(t, json.Unmarshal(b, &r))
	return r
}
