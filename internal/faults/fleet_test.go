package faults

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Integrations of the suite's catalog.
const (
	svcOAuth    = "oauthco"    // crm, oauth2: rotating refresh tokens
	svcKey      = "keyco"      // hris, api_key: periodic checks
	svcOnDemand = "ondemandco" // accounting, api_key: checked only when asked
	svcHost     = "hostco"     // ticketing, api_key on a consumer-chosen base URL

	envClientID     = "FAULTS_OAUTH_CLIENT_ID"
	envClientSecret = "FAULTS_OAUTH_CLIENT_SECRET"
	envHookSecret   = "FAULTS_WEBHOOK_SECRET"

	apiToken = "faults-api-token-0123456789abcdef"
)

var unifiedOf = map[string]string{svcOAuth: "crm", svcKey: "hris", svcOnDemand: "accounting", svcHost: "ticketing"}

// fleetOpts shapes one scenario's fleet.
type fleetOpts struct {
	workers, schedulers int
	// interval of periodic checks of callable/added connections; invalid
	// ones are checked every invalidInterval.
	interval, invalidInterval time.Duration
	// lease of scheduler claims (VAULTFLEET_LEASE).
	lease time.Duration
	// shutdownTimeout of workers (VAULTFLEET_SHUTDOWN_TIMEOUT).
	shutdownTimeout time.Duration
	// keyWave is the keyco invalid_wave guard, e.g. "{threshold: 5, window: 10s}".
	keyWave string
	// workerSecret is the OAuth client secret the workers get (default:
	// the one the provider expects).
	workerSecret string
	sentinel     bool
	webhooks     bool
	// keys is VAULTFLEET_ENCRYPTION_KEYS (default: one fresh key).
	keys string
}

// fleet is one scenario's world: Redis, providers, the vaultfleet
// processes and the test's own view of the store and the queues.
type fleet struct {
	t     *testing.T
	opts  fleetOpts
	dir   string
	ps    *procs
	prov  *provider
	hook  *webhookReceiver
	redis *redisServer
	sents *sentinelSet

	redisURL string
	catalog  string
	vars     map[string]string

	serve      *proc
	workers    []*proc
	schedulers []*proc

	rdb   redis.UniversalClient
	insp  *asynq.Inspector
	store *state.Store
	api   *apiClient

	// keysOf maps a consumer to its API key (key integrations).
	mu     sync.Mutex
	keysOf map[string]string
}

func newKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

func newFleet(t *testing.T, o fleetOpts) *fleet {
	t.Helper()
	needSuite(t)
	if o.workers == 0 {
		o.workers = 2
	}
	if o.schedulers == 0 {
		o.schedulers = 2
	}
	if o.interval == 0 {
		o.interval = pick(4*time.Second, 10*time.Second)
	}
	if o.invalidInterval == 0 {
		o.invalidInterval = 30 * time.Second
	}
	if o.lease == 0 {
		o.lease = pick(10*time.Second, 30*time.Second)
	}
	if o.shutdownTimeout == 0 {
		o.shutdownTimeout = 3 * time.Second
	}
	if o.keys == "" {
		o.keys = "k1:" + newKey()
	}
	dir := t.TempDir()
	f := &fleet{t: t, opts: o, dir: dir, ps: newProcs(t, dir), prov: newProvider(t), keysOf: map[string]string{}}
	if o.workerSecret == "" {
		o.workerSecret = f.prov.clientSecret
		f.opts.workerSecret = o.workerSecret
	}
	if o.sentinel {
		f.sents = startSentinels(t, f.ps)
		f.redisURL = f.sents.url()
		f.rdb = redis.NewFailoverClient(&redis.FailoverOptions{MasterName: f.sents.name,
			SentinelAddrs: []string{"127.0.0.1:" + itoa(f.sents.ports[0]), "127.0.0.1:" + itoa(f.sents.ports[1]), "127.0.0.1:" + itoa(f.sents.ports[2])}})
	} else {
		f.redis = startRedis(t, f.ps, "redis")
		f.redisURL = "redis://" + f.redis.addr() + "/0"
		f.rdb = redis.NewClient(&redis.Options{Addr: f.redis.addr()})
	}
	t.Cleanup(func() { _ = f.rdb.Close() })
	f.insp = asynq.NewInspectorFromRedisClient(f.rdb)
	f.catalog = filepath.Join(dir, "catalog.yaml")
	require.NoError(t, os.WriteFile(f.catalog, []byte(f.catalogYAML()), 0o600))
	cat, err := catalog.Load(f.catalog)
	require.NoError(t, err, "the suite's catalog must load")
	f.vars = map[string]string{
		"REDIS_URL":                  f.redisURL,
		"VAULTFLEET_ENCRYPTION_KEYS": o.keys,
		"VAULTFLEET_CATALOG":         f.catalog,
		"VAULTFLEET_API_TOKENS":      apiToken,
		"VAULTFLEET_LOG_LEVEL":       "info",
		"VAULTFLEET_LOG_FORMAT":      "json",
		envClientID:                  "faults-client",
		envClientSecret:              o.workerSecret,
	}
	if o.webhooks {
		f.hook = newWebhookReceiver(t)
		hooks := filepath.Join(dir, "webhooks.yaml")
		require.NoError(t, os.WriteFile(hooks, []byte(fmt.Sprintf(`- name: faults
  url: %s/hook
  secret_env: %s
  allow_insecure: true
`, f.hook.srv.URL, envHookSecret)), 0o600))
		f.vars["VAULTFLEET_WEBHOOKS"] = hooks
		f.vars[envHookSecret] = "faults-webhook-secret-0123456789abcdef"
	}
	f.store = f.openStore(t, cat, o.keys)
	f.serve = f.startServe()
	f.api = &apiClient{t: t, base: "http://" + f.serve.addr}
	for range o.schedulers {
		f.startScheduler()
	}
	for range o.workers {
		f.startWorker()
	}
	return f
}

// openStore opens the store as the fleet does, for the audit: it reads
// stored refresh tokens (the API never shows them).
func (f *fleet) openStore(t *testing.T, cat *catalog.Catalog, keys string) *state.Store {
	kr, err := secrets.ParseKeyring(keys)
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: f.rdb, Catalog: cat, Keys: kr})
	require.NoError(t, err)
	return st
}

func (f *fleet) catalogYAML() string {
	h, iv, inv := f.prov.host(), f.opts.interval, f.opts.invalidInterval
	intervals := fmt.Sprintf("{callable: %s, invalid: %s, added: %s}", iv, inv, iv)
	keyWave := ""
	if f.opts.keyWave != "" {
		keyWave = "    invalid_wave: " + f.opts.keyWave + "\n"
	}
	return fmt.Sprintf(`integrations:
  - id: %[1]s
    name: OAuthCo
    unified_api: crm
    auth_type: oauth2
    status: live
    check:
      url: http://%[5]s/oauth/check
    oauth:
      token_url: http://%[5]s/oauth/token
      client_id_env: %[6]s
      client_secret_env: %[7]s
      auth_style: params
    intervals: %[8]s
    allowed_hosts: ["%[5]s"]
    allow_http: true
  - id: %[2]s
    name: KeyCo
    unified_api: hris
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://%[5]s/key/check
    intervals: %[8]s
    allowed_hosts: ["%[5]s"]
    allow_http: true
%[9]s  - id: %[3]s
    name: OnDemandCo
    unified_api: accounting
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://%[5]s/key/check
    intervals: {callable: 6h, invalid: 6h, added: 6h}
    allowed_hosts: ["%[5]s"]
    allow_http: true
  - id: %[4]s
    name: HostCo
    unified_api: ticketing
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings:
      - name: base
        type: url
        required: true
    check:
      url: "{base}/key/check"
    intervals: %[8]s
    allowed_hosts: ["%[5]s", "*.faults.invalid"]
    allow_http: true
`, svcOAuth, svcKey, svcOnDemand, svcHost, h, envClientID, envClientSecret, intervals, keyWave)
}

func (f *fleet) env(extra map[string]string) []string {
	vars := map[string]string{}
	for k, v := range f.vars {
		vars[k] = v
	}
	for k, v := range extra {
		vars[k] = v
	}
	return baseEnv(vars)
}

func (f *fleet) startServe() *proc {
	return f.ps.start("serve", binPath, []string{"serve", "--addr", "127.0.0.1:0"}, f.env(nil), true)
}

func (f *fleet) startWorker() *proc {
	p := f.ps.start("worker", binPath, []string{"worker", "--addr", "127.0.0.1:0", "--concurrency", "20"},
		f.env(map[string]string{"VAULTFLEET_SHUTDOWN_TIMEOUT": f.opts.shutdownTimeout.String()}), true)
	f.workers = append(f.workers, p)
	return p
}

func (f *fleet) startScheduler() *proc {
	p := f.ps.start("scheduler", binPath, []string{"scheduler", "--addr", "127.0.0.1:0"},
		f.env(map[string]string{"VAULTFLEET_TICK": "200ms", "VAULTFLEET_LEASE": f.opts.lease.String()}), true)
	f.schedulers = append(f.schedulers, p)
	return p
}

// liveWorkers returns the workers still running.
func (f *fleet) liveWorkers() []*proc {
	var out []*proc
	for _, w := range f.workers {
		if !w.exited() {
			out = append(out, w)
		}
	}
	return out
}

// ---- seeding ----

func consumerID(kind string, i int) string { return fmt.Sprintf("%s-%03d", kind, i) }

// seedOAuth adds n OAuthCo connections "o-NNN"; their access tokens expire
// at now+exp (negative: already expired, so a refresh is due at once).
func (f *fleet) seedOAuth(n int, exp time.Duration) []string {
	var ids []string
	for i := range n {
		c := consumerID("o", i)
		expAt := time.Now().Add(exp).UTC().Truncate(time.Second)
		at, rt := f.prov.mint(c, expAt)
		f.api.put(c, svcOAuth, map[string]string{"access_token": at, "refresh_token": rt, "expires_at": expAt.Format(time.RFC3339)}, nil)
		ids = append(ids, c)
	}
	return ids
}

// seedKeys adds n connections of a key integration; kind prefixes the
// consumer ids; valid says whether the provider accepts their keys.
func (f *fleet) seedKeys(svc, kind string, n int, valid bool) []string {
	var ids []string
	for i := range n {
		c := consumerID(kind, i)
		k := f.prov.addKey(c, valid)
		var settings map[string]string
		if svc == svcHost {
			settings = map[string]string{"base": "http://" + f.prov.host()}
		}
		f.api.put(c, svc, map[string]string{"api_key": k}, settings)
		f.mu.Lock()
		f.keysOf[c] = k
		f.mu.Unlock()
		ids = append(ids, c)
	}
	return ids
}

// ---- the HTTP API ----

type apiClient struct {
	t    *testing.T
	base string
}

type connView struct {
	ID         string `json:"id"`
	ConsumerID string `json:"consumer_id"`
	ServiceID  string `json:"service_id"`
	State      string `json:"state"`
	Health     string `json:"health"`
	Validation *struct {
		Verdict   string    `json:"verdict"`
		Reason    string    `json:"reason"`
		CheckedAt time.Time `json:"checked_at"`
		Current   bool      `json:"current"`
	} `json:"validation"`
}

func (c connView) reason() string {
	if c.Validation == nil {
		return ""
	}
	return c.Validation.Reason
}

var httpClient = &http.Client{Timeout: 15 * time.Second}

func (a *apiClient) do(method, path string, body any) (int, []byte, error) {
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.base+path, r)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+apiToken)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func connPath(consumer, svc string) string {
	return "/v1/consumers/" + consumer + "/connections/" + unifiedOf[svc] + "/" + svc
}

// put writes a connection; it retries a moment on 5xx (the store may be
// settling) and fails the test on anything but 2xx.
func (a *apiClient) put(consumer, svc string, creds, settings map[string]string) {
	a.t.Helper()
	code, b := a.putStatus(consumer, svc, creds, settings)
	if code/100 != 2 {
		a.t.Fatalf("PUT %s: %d %s", connPath(consumer, svc), code, b)
	}
}

func (a *apiClient) putStatus(consumer, svc string, creds, settings map[string]string) (int, []byte) {
	body := map[string]any{"credentials": creds}
	if settings != nil {
		body["settings"] = settings
	}
	var code int
	var b []byte
	for attempt := 0; attempt < 20; attempt++ {
		var err error
		code, b, err = a.do(http.MethodPut, connPath(consumer, svc), body)
		if err == nil && code < 500 {
			return code, b
		}
		time.Sleep(250 * time.Millisecond)
	}
	return code, b
}

// validate asks for a validation now; it returns the status.
func (a *apiClient) validate(consumer, svc string) int {
	code, _, err := a.do(http.MethodPost, connPath(consumer, svc)+"/validate", nil)
	if err != nil {
		return 0
	}
	return code
}

// list reads every connection through GET /v1/connections, page by page.
// It returns the first error status met (with the connections read so far).
func (a *apiClient) list() ([]connView, int, error) {
	var out []connView
	cursor := ""
	for {
		path := "/v1/connections?limit=200"
		if cursor != "" {
			path += "&cursor=" + cursor
		}
		code, b, err := a.do(http.MethodGet, path, nil)
		if err != nil {
			return out, 0, err
		}
		if code != http.StatusOK {
			return out, code, fmt.Errorf("GET %s: %d %s", path, code, b)
		}
		var page struct {
			Data []connView `json:"data"`
			Meta struct {
				NextCursor *string `json:"next_cursor"`
			} `json:"meta"`
		}
		if err := json.Unmarshal(b, &page); err != nil {
			return out, code, err
		}
		out = append(out, page.Data...)
		if page.Meta.NextCursor == nil || *page.Meta.NextCursor == "" {
			return out, code, nil
		}
		cursor = *page.Meta.NextCursor
	}
}

// byConsumer lists and indexes by consumer (each suite consumer has one
// connection). Errors give nil.
func (a *apiClient) byConsumer() map[string]connView {
	l, _, err := a.list()
	if err != nil {
		return nil
	}
	m := make(map[string]connView, len(l))
	for _, c := range l {
		m[c.ConsumerID] = c
	}
	return m
}

// ---- the queues ----

// archived counts archived (dead) tasks of every queue.
func (f *fleet) archived() int {
	qs, err := f.insp.Queues()
	if err != nil {
		return -1
	}
	n := 0
	for _, q := range qs {
		if qi, err := f.insp.GetQueueInfo(q); err == nil {
			n += qi.Archived
		}
	}
	return n
}

// refreshChains returns, per connection, how many connection:refresh_token
// tasks exist at once (pending, active, scheduled, retry) over every queue.
func (f *fleet) refreshChains() map[string]int {
	out := map[string]int{}
	qs, err := f.insp.Queues()
	if err != nil {
		return out
	}
	// Distinct tasks (queue and id): the four listings are not one atomic
	// read, so a task moving from retry to pending to active between them
	// would otherwise be counted up to three times.
	seen := map[string]bool{}
	count := func(ts []*asynq.TaskInfo, err error) {
		if err != nil {
			return
		}
		for _, ti := range ts {
			if ti.Type != tasks.TypeRefreshToken || seen[ti.Queue+"/"+ti.ID] {
				continue
			}
			seen[ti.Queue+"/"+ti.ID] = true
			p, err := tasks.ParseConnectionPayload(ti.Payload)
			if err != nil {
				continue
			}
			out[p.ConsumerID+"|"+p.ConnectionID]++
		}
	}
	for _, q := range qs {
		size := asynq.PageSize(1000)
		count(f.insp.ListPendingTasks(q, size))
		count(f.insp.ListActiveTasks(q, size))
		count(f.insp.ListScheduledTasks(q, size))
		count(f.insp.ListRetryTasks(q, size))
	}
	return out
}

// validateTasks describes, per consumer of consumers, the validate tasks
// the queues hold for it ("critical/retry", ...): what a scenario prints
// when on-demand checks did not run in time.
func (f *fleet) validateTasks(consumers []string) map[string][]string {
	want := map[string]bool{}
	for _, c := range consumers {
		want[c] = true
	}
	out := map[string][]string{}
	qs, err := f.insp.Queues()
	if err != nil {
		out["(inspector)"] = []string{err.Error()}
		return out
	}
	list := func(q, st string, ts []*asynq.TaskInfo, err error) {
		if err != nil {
			return
		}
		for _, ti := range ts {
			if ti.Type != tasks.TypeValidate {
				continue
			}
			if p, err := tasks.ParseConnectionPayload(ti.Payload); err == nil && want[p.ConsumerID] {
				out[p.ConsumerID] = append(out[p.ConsumerID], fmt.Sprintf("%s/%s(retried %d, %q)", q, st, ti.Retried, ti.LastErr))
			}
		}
	}
	for _, q := range qs {
		size := asynq.PageSize(1000)
		ts, err := f.insp.ListPendingTasks(q, size)
		list(q, "pending", ts, err)
		ts, err = f.insp.ListActiveTasks(q, size)
		list(q, "active", ts, err)
		ts, err = f.insp.ListRetryTasks(q, size)
		list(q, "retry", ts, err)
		ts, err = f.insp.ListScheduledTasks(q, size)
		list(q, "scheduled", ts, err)
	}
	return out
}

// events reads the state-change stream.
func (f *fleet) events() []state.Event {
	msgs, err := f.rdb.XRange(context.Background(), state.DefaultEventStream, "-", "+").Result()
	if err != nil {
		return nil
	}
	out := make([]state.Event, 0, len(msgs))
	for _, m := range msgs {
		if e, err := state.ParseEvent(m); err == nil {
			out = append(out, e)
		}
	}
	return out
}

// metric sums the samples of a family on a process's /metrics whose
// labels contain every given label pair. found is false when no sample
// exists.
func metric(addr, family string, labels ...string) (sum float64, found bool) {
	resp, err := httpClient.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(family) + `(\{[^}]*\})? ([0-9.eE+-]+)$`)
	for _, m := range re.FindAllStringSubmatch(string(b), -1) {
		ok := true
		for _, l := range labels {
			if !strings.Contains(m[1], l) {
				ok = false
			}
		}
		if ok {
			v, _ := strconv.ParseFloat(m[2], 64)
			sum += v
			found = true
		}
	}
	return sum, found
}

// pid returns the process id of a running process (0 if none).
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// activeRefreshes returns, by worker process id, how many tasks on OAuth
// connections (refreshes, and validations that refresh first) each asynq
// server reports active (its heartbeat, every few seconds).
func (f *fleet) activeRefreshes() map[int]int {
	out := map[int]int{}
	srvs, err := f.insp.Servers()
	if err != nil {
		return out
	}
	oauthID := state.ConnectionID(unifiedOf[svcOAuth], svcOAuth)
	for _, s := range srvs {
		for _, w := range s.ActiveWorkers {
			if w.TaskType != tasks.TypeRefreshToken && w.TaskType != tasks.TypeValidate {
				continue
			}
			if p, err := tasks.ParseConnectionPayload(w.TaskPayload); err == nil && p.ConnectionID == oauthID {
				out[s.PID]++
			}
		}
	}
	return out
}

// busiestWorker waits until a live worker reports active refresh tasks
// and returns the one with the most.
func (f *fleet) busiestWorker(among []*proc) (*proc, int) {
	var best *proc
	n := 0
	waitFor(20*time.Second, 100*time.Millisecond, func() bool {
		act := f.activeRefreshes()
		for _, w := range among {
			if k := act[w.pid()]; k > n && !w.exited() {
				best, n = w, k
			}
		}
		return best != nil
	})
	return best, n
}
