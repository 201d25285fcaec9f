package scheduler_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) {
	// go-redis logs every failed dial; the outage tests cause many.
	redis.SetLogger(quietLogger{})
	redistest.Main(m)
}

type quietLogger struct{}

func (quietLogger) Printf(context.Context, string, ...any) {}

// testCatalog has one live api_key integration (pipedrive), one live
// oauth2 integration with a 5m refresh window (hubspot) and one that is
// not checked (zoho, development).
const testCatalog = `
integrations:
  - id: pipedrive
    name: Pipedrive
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: https://api.pipedrive.com/v1/users/me
      auth: {scheme: query, name: api_token, field: api_key}
    allowed_hosts: [api.pipedrive.com]
    intervals: {callable: 1h, invalid: 6h, added: 1h}
  - id: hubspot
    name: HubSpot
    unified_api: crm
    auth_type: oauth2
    status: live
    check:
      url: https://api.hubapi.com/account-info/v3/details
    oauth:
      token_url: https://api.hubapi.com/oauth/v1/token
      client_id_env: HUBSPOT_CLIENT_ID
      client_secret_env: HUBSPOT_CLIENT_SECRET
    allowed_hosts: [api.hubapi.com]
    refresh_window: 5m
  - id: zoho
    name: Zoho
    unified_api: crm
    auth_type: api_key
    status: development
    credential_fields: [api_key]
    check:
      url: https://www.zohoapis.com/crm/v2/users
    allowed_hosts: [www.zohoapis.com]
`

const (
	pipedrive = "crm+pipedrive"
	hubspot   = "crm+hubspot"
	zoho      = "crm+zoho"
)

// safetyNet is how far ahead the store puts the first check of a new
// connection (state.Store: now+30s).
const safetyNet = 30 * time.Second

func loadCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	cat, err := catalog.Parse([]byte(testCatalog))
	require.NoError(t, err)
	return cat
}

func testKeys(t testing.TB) *secrets.Keyring {
	t.Helper()
	k, err := secrets.ParseKeyring("k1:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))
	require.NoError(t, err)
	return k
}

// clock is a settable clock safe for concurrent use.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock { c := &clock{}; c.Set(t); return c }
func (c *clock) Now() time.Time   { return time.Unix(0, c.ns.Load()) }
func (c *clock) Set(t time.Time)  { c.ns.Store(t.UnixNano()) }
func (c *clock) Add(d time.Duration) {
	c.ns.Add(int64(d))
}

// bundle is what a scheduler test works with: one Redis database shared
// by the store and asynq, the store's clock frozen at t0.
type bundle struct {
	rdb    redis.UniversalClient
	cat    *catalog.Catalog
	store  *state.Store
	client *asynq.Client
	insp   *asynq.Inspector
	t0     time.Time
}

func setup(t *testing.T) *bundle {
	t.Helper()
	return setupOn(t, redistest.Start(t).Client(t), nil)
}

// setupOn builds a bundle on rdb; queue, if not nil, is the Redis the
// tasks go to.
func setupOn(t *testing.T, rdb redis.UniversalClient, queue redis.UniversalClient) *bundle {
	t.Helper()
	if queue == nil {
		queue = rdb
	}
	b := &bundle{rdb: rdb, cat: loadCatalog(t), t0: time.Now().Truncate(time.Second)}
	var err error
	b.store, err = state.New(state.Config{Client: rdb, Catalog: b.cat, Keys: testKeys(t),
		NowFunc: func() time.Time { return b.t0 }})
	require.NoError(t, err)
	b.client = asynq.NewClientFromRedisClient(queue)
	b.insp = asynq.NewInspectorFromRedisClient(queue)
	return b
}

// config returns a scheduler config on the bundle with a fast tick and
// one task per periodic check (CheckBatch 1), which most tests count and
// look up by task id; batch_test.go tests the batches.
func (b *bundle) config(now func() time.Time) scheduler.Config {
	return scheduler.Config{Store: b.store, Catalog: b.cat, Client: b.client, Inspector: b.insp,
		Tick: 20 * time.Millisecond, NowFunc: now, Registerer: prometheus.NewRegistry(), CheckBatch: 1}
}

func ptr[T any](v T) *T { return &v }

// consumer returns the i-th test consumer id.
func consumer(i int) string { return fmt.Sprintf("c%06d", i) }

// seedAPIKey puts n enabled pipedrive connections with an API key,
// consumers from..from+n-1, 16 at a time.
func (b *bundle) seedAPIKey(t testing.TB, from, n int) {
	t.Helper()
	b.seed(t, from, n, func(int) (string, state.Input) {
		return pipedrive, state.Input{Credentials: map[string]string{"api_key": "secret"}}
	})
}

func (b *bundle) seed(t testing.TB, from, n int, f func(i int) (string, state.Input)) {
	t.Helper()
	var g errgroup.Group
	g.SetLimit(16)
	for i := from; i < from+n; i++ {
		g.Go(func() error {
			conn, in := f(i)
			_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: consumer(i), ConnectionID: conn}, in, 0)
			return err
		})
	}
	require.NoError(t, g.Wait())
}

// oauthInput is a hubspot input whose token expires at exp.
func oauthInput(exp time.Time) state.Input {
	return state.Input{Credentials: map[string]string{
		"access_token": "at", "refresh_token": "rt", "expires_at": exp.UTC().Format(time.RFC3339)}}
}

// countingEnqueuer wraps an Enqueuer and counts outcomes.
type countingEnqueuer struct {
	next      scheduler.Enqueuer
	ok, dup   atomic.Int64
	failed    atomic.Int64
	failUntil atomic.Bool
}

func (c *countingEnqueuer) EnqueueContext(ctx context.Context, t *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error) {
	if c.failUntil.Load() {
		c.failed.Add(1)
		return nil, fmt.Errorf("injected enqueue failure")
	}
	info, err := c.next.EnqueueContext(ctx, t, opts...)
	switch {
	case err == nil:
		c.ok.Add(1)
	case errors.Is(err, asynq.ErrTaskIDConflict):
		c.dup.Add(1)
	default:
		c.failed.Add(1)
	}
	return info, err
}

// allTasks lists the pending tasks of queue across pages.
func allTasks(t testing.TB, insp *asynq.Inspector, queue string) []*asynq.TaskInfo {
	t.Helper()
	var out []*asynq.TaskInfo
	for page := 1; ; page++ {
		ts, err := insp.ListPendingTasks(queue, asynq.PageSize(1000), asynq.Page(page))
		if err != nil && strings.Contains(err.Error(), "not found") {
			return out
		}
		require.NoError(t, err)
		out = append(out, ts...)
		if len(ts) < 1000 {
			return out
		}
	}
}

// pending returns the pending size of queue, 0 if it never existed.
func pending(t testing.TB, insp *asynq.Inspector, queue string) int {
	t.Helper()
	qs, err := insp.Queues()
	require.NoError(t, err)
	for _, q := range qs {
		if q == queue {
			info, err := insp.GetQueueInfo(queue)
			require.NoError(t, err)
			return info.Pending
		}
	}
	return 0
}

func payload(t testing.TB, ti *asynq.TaskInfo) tasks.ConnectionPayload {
	t.Helper()
	p, err := tasks.ParseConnectionPayload(ti.Payload)
	require.NoError(t, err)
	return p
}

// dueKey is the store's key of one shard of a due index (state/store_keys.go).
func dueKey(shard int, idx state.Index) string {
	return fmt.Sprintf("%s:{s%02d}:due:%s", state.DefaultPrefix, shard, idx)
}

// dueScores returns every member of idx with its due time. t may be an
// EventuallyWithT's CollectT: a condition runs on another goroutine.
func dueScores(t require.TestingT, rdb redis.UniversalClient, shards int, idx state.Index) map[string]time.Time {
	helper(t)
	out := map[string]time.Time{}
	for sh := range shards {
		zs, err := rdb.ZRangeWithScores(context.Background(), dueKey(sh, idx), 0, -1).Result()
		require.NoError(t, err)
		for _, z := range zs {
			out[z.Member.(string)] = time.UnixMilli(int64(z.Score))
		}
	}
	return out
}

// helper marks the caller a test helper when t is a testing.TB.
func helper(t require.TestingT) {
	if h, ok := t.(interface{ Helper() }); ok {
		h.Helper()
	}
}

// runScheduler runs s until the test ends.
func runScheduler(t *testing.T, s *scheduler.Scheduler) context.CancelFunc {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				require.NoError(t, err)
			case <-time.After(15 * time.Second):
				t.Error("Run did not return after its context was cancelled")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// metric returns the value of a counter or gauge in reg with the given
// labels ("" matches a metric without labels).
func metric(t require.TestingT, reg prometheus.Gatherer, name string, labels ...string) float64 {
	helper(t)
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.Counter != nil:
					return m.Counter.GetValue()
				case m.Gauge != nil:
					return m.Gauge.GetValue()
				case m.Histogram != nil:
					return float64(m.Histogram.GetSampleCount())
				}
			}
		}
	}
	t.Errorf("metric %s%v not found", name, labels)
	t.FailNow()
	return 0
}

func matches(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// logRecorder is a slog handler that keeps records for assertions.
type logRecorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, r.Clone())
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

// count returns how many records contain msg.
func (l *logRecorder) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.recs {
		if strings.Contains(r.Message, msg) {
			n++
		}
	}
	return n
}

func unix(t time.Time) string { return strconv.FormatInt(t.Unix(), 10) }

// perClaimStore hides state.Store's RescheduleBatch, so the scheduler
// takes its one-Reschedule-per-claim path (the baseline of the batched one).
type perClaimStore struct{ scheduler.Store }

var (
	_ scheduler.BatchRescheduler = (*state.Store)(nil)
	_ scheduler.Store            = perClaimStore{}
)

// countClaims wraps st so that n counts its ClaimDue calls, keeping
// RescheduleBatch if st has it.
func countClaims(st scheduler.Store, n *atomic.Int64) scheduler.Store {
	c := claimCounter{Store: st, n: n}
	if br, ok := st.(scheduler.BatchRescheduler); ok {
		return batchClaimCounter{claimCounter: c, BatchRescheduler: br}
	}
	return c
}

type claimCounter struct {
	scheduler.Store
	n *atomic.Int64
}

func (c claimCounter) ClaimDue(ctx context.Context, idx state.Index, shard int, now time.Time, lease time.Duration, max int) ([]state.Claim, error) {
	c.n.Add(1)
	return c.Store.ClaimDue(ctx, idx, shard, now, lease, max)
}

type batchClaimCounter struct {
	claimCounter
	scheduler.BatchRescheduler
}

// newBatchStore returns the store itself: it implements BatchRescheduler.
func newBatchStore(_ testing.TB, st *state.Store, _ redis.UniversalClient) scheduler.Store { return st }
