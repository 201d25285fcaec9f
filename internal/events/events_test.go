package events_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) { redistest.Main(m) }

const secret = "whsec-0123456789abcdef"

func newStore(t testing.TB, rdb *redis.Client) *state.Store {
	t.Helper()
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	return st
}

func TestStateFlipIsOneStreamEntry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	st := newStore(t, rdb)
	ref := state.Ref{ConsumerID: "flip", ConnectionID: "crm+pipedrive"}
	ch, err := st.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
	require.NoError(t, err)
	evs, err := st.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	require.Equal(t, state.EventCreated, evs[0].Type)
	last := evs[0].ID

	_, err = st.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)
	evs, err = st.ReadEvents(ctx, last, 0)
	require.NoError(t, err)
	require.Len(t, evs, 1, "one flip, one entry")
	e := evs[0]
	require.Equal(t, state.EventCallable, e.Type)
	require.Equal(t, state.Added, e.StateBefore)
	require.Equal(t, state.Callable, e.StateAfter)
	require.Equal(t, "flip", e.ConsumerID)
	require.Equal(t, "crm+pipedrive", e.ConnectionID)
	require.Equal(t, "pipedrive", e.ServiceID)
	require.Equal(t, "crm", e.UnifiedAPI)
	last = e.ID

	// The same verdict again changes nothing visible: no entry.
	_, err = st.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)
	evs, err = st.ReadEvents(ctx, last, 0)
	require.NoError(t, err)
	require.Empty(t, evs)
}

// receiver is a webhook endpoint that verifies every request and can be
// "down" (answering 503).
type receiver struct {
	srv  *httptest.Server
	down atomic.Bool
	mu   sync.Mutex
	// attempts by idempotency key, in arrival order.
	attempts map[string][]attempt
	badSigs  int
}

type attempt struct {
	status  int
	body    events.Webhook
	attempt string
	event   string
}

func newReceiver(t testing.TB) *receiver {
	r := &receiver{attempts: map[string][]attempt{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		r.mu.Lock()
		defer r.mu.Unlock()
		if err := events.Verify(secret, req.Header.Get(events.HeaderSignature), body, time.Now(), 0); err != nil {
			r.badSigs++
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var wh events.Webhook
		if err := json.Unmarshal(body, &wh); err != nil {
			r.badSigs++
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		key := req.Header.Get(events.HeaderIdempotencyKey)
		status := http.StatusOK
		if r.down.Load() {
			status = http.StatusServiceUnavailable
		}
		r.attempts[key] = append(r.attempts[key], attempt{status: status, body: wh,
			attempt: req.Header.Get(events.HeaderAttempt), event: req.Header.Get(events.HeaderEvent)})
		w.WriteHeader(status)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *receiver) snapshot() (map[string][]attempt, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string][]attempt, len(r.attempts))
	for k, v := range r.attempts {
		out[k] = append([]attempt(nil), v...)
	}
	return out, r.badSigs
}

func (r *receiver) failures() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, as := range r.attempts {
		for _, a := range as {
			if a.status != http.StatusOK {
				n++
			}
		}
	}
	return n
}

func subscriptionsYAML(url string) string {
	return fmt.Sprintf(`
- name: all
  url: %s/hooks/all
  secret_env: TEST_WEBHOOK_SECRET
  allow_insecure: true
- name: flips
  url: %s/hooks/flips
  secret_env: TEST_WEBHOOK_SECRET
  events: [vault.connection.callable, vault.connection.invalid]
  allow_insecure: true
`, url, url)
}

// TestWebhooksEndToEnd runs the store, the relay and a real asynq server
// with the delivery handler against a receiver that is down for a while.
func TestWebhooksEndToEnd(t *testing.T) {
	// Not parallel: it checks for leaked goroutines.
	ignore := goleak.IgnoreCurrent()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdb := redistest.Start(t).Client(t)
	st := newStore(t, rdb)
	recv := newReceiver(t)
	recv.down.Store(true)
	subs, err := events.ParseSubscriptions([]byte(subscriptionsYAML(recv.srv.URL)), func(k string) string {
		if k == "TEST_WEBHOOK_SECRET" {
			return secret
		}
		return ""
	})
	require.NoError(t, err)

	reg := prometheus.NewRegistry()
	client := asynq.NewClientFromRedisClient(rdb)
	h, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""), Subscriptions: subs, Registerer: reg, Timeout: 2 * time.Second})
	require.NoError(t, err)
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency:              8,
		Queues:                   map[string]int{tasks.QueueEvents: 1},
		RetryDelayFunc:           func(int, error, *asynq.Task) time.Duration { return 100 * time.Millisecond },
		DelayedTaskCheckInterval: 100 * time.Millisecond,
		TaskCheckInterval:        50 * time.Millisecond,
		LogLevel:                 asynq.FatalLevel,
	})
	mux := asynq.NewServeMux()
	mux.Handle(tasks.TypeWebhookDeliver, h)
	require.NoError(t, srv.Start(mux))
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: client, Subscriptions: subs,
		Block: 100 * time.Millisecond, Registerer: reg})
	require.NoError(t, err)
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(ctx) }()

	// A connection's life: created, callable, a 5-failure outage,
	// recovered, invalid, disabled.
	ref := state.Ref{ConsumerID: "e2e", ConnectionID: "crm+pipedrive"}
	ch, err := st.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
	require.NoError(t, err)
	rev := ch.After.Revision
	_, err = st.ApplyVerdict(ctx, ref, rev, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)
	for i := range 5 {
		_, err = st.RecordTransient(ctx, ref, rev, fmt.Sprintf("HTTP 503 (attempt %d)", i+1))
		require.NoError(t, err)
	}
	_, err = st.ApplyVerdict(ctx, ref, rev, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)
	_, err = st.ApplyVerdict(ctx, ref, rev, state.Verdict{Outcome: state.OutcomeInvalid, Reason: state.ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)
	off := false
	_, err = st.Patch(ctx, ref, state.Input{Enabled: &off}, 0)
	require.NoError(t, err)

	stream, err := st.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	var types []string
	for _, e := range stream {
		types = append(types, e.Type)
	}
	require.Equal(t, []string{state.EventCreated, state.EventCallable, state.EventDownstreamDegraded,
		state.EventDownstreamRecovered, state.EventInvalid, state.EventDisabled}, types,
		"one degraded and one recovered for a 5-failure outage")
	expected := map[string]state.Event{}
	for _, e := range stream {
		for _, s := range subs {
			if s.Matches(e.Type) {
				expected[tasks.IdempotencyKey(e.ID, s.Name)] = e
			}
		}
	}
	require.Len(t, expected, 6+2)

	// The receiver is down until every delivery failed at least once.
	require.Eventually(t, func() bool {
		got, _ := recv.snapshot()
		if len(got) < len(expected) {
			return false
		}
		for _, as := range got {
			if len(as) < 2 {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "every delivery retried while the receiver was down")
	recv.down.Store(false)

	delivered := func() bool {
		got, _ := recv.snapshot()
		for k := range expected {
			as := got[k]
			if len(as) == 0 || as[len(as)-1].status != http.StatusOK {
				return false
			}
		}
		return true
	}
	require.Eventually(t, delivered, 20*time.Second, 20*time.Millisecond, "everything delivered after the receiver came back")

	got, badSigs := recv.snapshot()
	require.Zero(t, badSigs, "every request carried a valid signature")
	require.Len(t, got, len(expected), "no delivery for an unexpected key")
	perType := map[string]int{}
	for key, as := range got {
		e, ok := expected[key]
		require.True(t, ok, key)
		okCount := 0
		for i, a := range as {
			// Same key and body on every attempt; attempts count up.
			require.Equal(t, key, a.body.ID)
			require.Equal(t, e.Type, a.event)
			require.Equal(t, e.Type, a.body.Type)
			require.Equal(t, strconv.Itoa(i+1), a.attempt, "attempt header of %s", key)
			require.Equal(t, e.ConnectionID, a.body.Data.ConnectionID)
			require.Equal(t, e.ConsumerID, a.body.Data.ConsumerID)
			require.Equal(t, string(e.StateBefore), a.body.Data.StateBefore)
			require.Equal(t, string(e.StateAfter), a.body.Data.StateAfter)
			require.Equal(t, string(e.HealthAfter), a.body.Data.HealthAfter)
			require.Equal(t, e.Reason, a.body.Data.Reason)
			require.Equal(t, e.Version, a.body.Data.Version)
			require.WithinDuration(t, e.Time, a.body.CreatedAt, time.Millisecond)
			require.Equal(t, as[0].body, a.body, "the body is the same on every attempt")
			if a.status == http.StatusOK {
				okCount++
			}
		}
		require.Equal(t, 1, okCount, "%s delivered once", key)
		require.GreaterOrEqual(t, len(as), 3, "%s: two failures while down, then delivered", key)
		if strings.Contains(key, "webhook:all:") {
			perType[e.Type]++
		}
	}
	require.Equal(t, 1, perType[state.EventDownstreamDegraded])
	require.Equal(t, 1, perType[state.EventDownstreamRecovered])

	// The receiver answers before the delivery handler counts the answer:
	// the counters catch up a moment later.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Equal(c, float64(len(expected)), counter(c, reg, "vaultfleet_webhook_deliveries_total", events.OutcomeDelivered))
		assert.Equal(c, float64(recv.failures()), counter(c, reg, "vaultfleet_webhook_deliveries_total", events.OutcomeFailed))
	}, 10*time.Second, 20*time.Millisecond, "every delivery and failure counted")

	// The stream is fully acknowledged.
	pend, err := rdb.XPending(ctx, state.DefaultEventStream, events.DefaultGroup).Result()
	require.NoError(t, err)
	require.Zero(t, pend.Count)

	cancel()
	require.NoError(t, <-relayDone)
	srv.Shutdown()
	recv.srv.Close()
	recv.srv.CloseClientConnections()
	h.CloseIdleConnections()
	goleak.VerifyNone(t, ignore, goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"))
}

// counter reads a counter of reg by its outcome label.
func counter(t require.TestingT, reg *prometheus.Registry, name, outcome string) float64 {
	if h, ok := t.(interface{ Helper() }); ok {
		h.Helper()
	}
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// addEntries appends n raw events to the stream and returns their ids.
func addEntries(t testing.TB, rdb *redis.Client, n int, typ string) []string {
	t.Helper()
	var ids []string
	for i := range n {
		id, err := rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: state.DefaultEventStream, Values: []any{
			"type", typ, "connection_id", "crm+pipedrive", "consumer_id", fmt.Sprintf("c%d", i),
			"service_id", "pipedrive", "unified_api", "crm", "version", "1",
			"time", time.Now().UTC().Format(time.RFC3339Nano)}}).Result()
		require.NoError(t, err)
		ids = append(ids, id)
	}
	return ids
}

func pendingTaskIDs(t testing.TB, rdb *redis.Client) map[string]bool {
	t.Helper()
	out, err := pendingTasks(rdb)
	require.NoError(t, err)
	return out
}

// pendingTasks is pendingTaskIDs for a require.Eventually condition, which
// runs on another goroutine: it reports errors instead of failing.
func pendingTasks(rdb *redis.Client) (map[string]bool, error) {
	ins := asynq.NewInspectorFromRedisClient(rdb)
	ts, err := ins.ListPendingTasks(tasks.QueueEvents, asynq.PageSize(1000))
	if err != nil && strings.Contains(err.Error(), "does not exist") {
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, ti := range ts {
		out[ti.ID] = true
	}
	return out, nil
}

func TestRelayClaimsEntriesOfADeadRelay(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdb := redistest.Start(t).Client(t)
	require.NoError(t, rdb.XGroupCreateMkStream(ctx, state.DefaultEventStream, events.DefaultGroup, "0").Err())
	ids := addEntries(t, rdb, 5, state.EventInvalid)
	// A relay reads the entries and dies before acknowledging them.
	res, err := rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: events.DefaultGroup, Consumer: "dead-relay",
		Streams: []string{state.DefaultEventStream, ">"}, Count: 10}).Result()
	require.NoError(t, err)
	require.Len(t, res[0].Messages, 5)

	subs := []events.Subscription{{Name: "s1", URL: "https://hooks.example.com/a", Secret: secret},
		{Name: "s2", URL: "https://hooks.example.com/b", Secret: secret, Events: []string{state.EventCallable}}}
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: asynq.NewClientFromRedisClient(rdb),
		Subscriptions: subs, Consumer: "live-relay", Block: 50 * time.Millisecond,
		ClaimIdle: 200 * time.Millisecond, ClaimInterval: 50 * time.Millisecond, ConsumerExpiry: time.Millisecond})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()

	require.Eventually(t, func() bool {
		p, err := rdb.XPending(ctx, state.DefaultEventStream, events.DefaultGroup).Result()
		if err != nil || p.Count != 0 {
			return false
		}
		got, err := pendingTasks(rdb)
		return err == nil && len(got) == len(ids)
	}, 10*time.Second, 20*time.Millisecond)
	got := pendingTaskIDs(t, rdb)
	for _, id := range ids {
		require.True(t, got[tasks.IdempotencyKey(id, "s1")], id)
		require.False(t, got[tasks.IdempotencyKey(id, "s2")], "s2 does not want invalid events")
	}
	// The dead relay, with nothing pending any more, is removed from the group.
	require.Eventually(t, func() bool {
		cs, err := rdb.XInfoConsumers(ctx, state.DefaultEventStream, events.DefaultGroup).Result()
		if err != nil {
			return false
		}
		for _, c := range cs {
			if c.Name == "dead-relay" {
				return false
			}
		}
		return true
	}, 5*time.Second, 20*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}

// flakyEnqueuer fails its first n calls.
type flakyEnqueuer struct {
	next  events.Enqueuer
	fails atomic.Int64
	calls atomic.Int64
}

func (f *flakyEnqueuer) EnqueueContext(ctx context.Context, t *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error) {
	f.calls.Add(1)
	if f.fails.Add(-1) >= 0 {
		return nil, errors.New("redis: connection refused")
	}
	return f.next.EnqueueContext(ctx, t, opts...)
}

func TestRelayTwoRelaysAndEnqueueFailures(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdb := redistest.Start(t).Client(t)
	subs := []events.Subscription{{Name: "s1", URL: "https://hooks.example.com/a", Secret: secret}}
	flaky := &flakyEnqueuer{next: asynq.NewClientFromRedisClient(rdb)}
	flaky.fails.Store(3)
	var wg sync.WaitGroup
	for i, enq := range []events.Enqueuer{flaky, asynq.NewClientFromRedisClient(rdb)} {
		relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: enq, Subscriptions: subs,
			Consumer: fmt.Sprintf("relay-%d", i), Block: 50 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
			ClaimIdle: 300 * time.Millisecond, ClaimInterval: 100 * time.Millisecond})
		require.NoError(t, err)
		wg.Go(func() { assert.NoError(t, relay.Run(ctx)) }) // not require: another goroutine
	}
	// Entries are added once the group exists (at the stream's end).
	require.Eventually(t, func() bool {
		g, err := rdb.XInfoGroups(ctx, state.DefaultEventStream).Result()
		return err == nil && len(g) == 1
	}, 10*time.Second, 10*time.Millisecond, "relays created their group")
	ids := addEntries(t, rdb, 40, state.EventUpdated)
	require.Eventually(t, func() bool {
		p, err := rdb.XPending(ctx, state.DefaultEventStream, events.DefaultGroup).Result()
		if err != nil || p.Count != 0 {
			return false
		}
		got, err := pendingTasks(rdb)
		return err == nil && len(got) == len(ids)
	}, 10*time.Second, 20*time.Millisecond)
	got := pendingTaskIDs(t, rdb)
	for _, id := range ids {
		require.True(t, got[tasks.IdempotencyKey(id, "s1")])
	}
	require.Greater(t, flaky.calls.Load(), int64(3), "the failing relay retried")
	cancel()
	wg.Wait()
}

func TestRelayWithoutSubscriptionsAcknowledges(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdb := redistest.Start(t).Client(t)
	addEntries(t, rdb, 3, state.EventUpdated)
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: asynq.NewClientFromRedisClient(rdb),
		Block: 50 * time.Millisecond})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	require.Eventually(t, func() bool {
		g, err := rdb.XInfoGroups(ctx, state.DefaultEventStream).Result()
		return err == nil && len(g) == 1 && g[0].Pending == 0 && g[0].LastDeliveredID != "0-0"
	}, 5*time.Second, 20*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}

// TestRelayRecreatesItsGroupAfterTheStreamIsGone: a Redis flushed or
// restarted without persistence loses the stream and its group; the relay
// creates them again and relays what comes next (before, the wrapped
// NOGROUP error was never recognised and the relay backed off forever).
func TestRelayRecreatesItsGroupAfterTheStreamIsGone(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdb := redistest.Start(t).Client(t)
	subs := []events.Subscription{{Name: "s1", URL: "https://hooks.example.com/a", Secret: secret}}
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""),
		Enqueuer: asynq.NewClientFromRedisClient(rdb), Subscriptions: subs,
		Block: 50 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	ins := asynq.NewInspectorFromRedisClient(rdb)
	enqueued := func(id string) bool {
		_, err := ins.GetTaskInfo(tasks.QueueEvents, tasks.IdempotencyKey(id, "s1"))
		return err == nil
	}
	first := addEntries(t, rdb, 1, state.EventUpdated)
	require.Eventually(t, func() bool { return enqueued(first[0]) }, 10*time.Second, 20*time.Millisecond)

	require.NoError(t, rdb.Del(ctx, state.DefaultEventStream).Err())
	require.Eventually(t, func() bool {
		// Each try adds an entry until the recreated group relays one
		// (a group made at "0" after the deletion starts at the first).
		id, err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: state.DefaultEventStream,
			Values: []any{"type", state.EventInvalid, "connection_id", "crm+pipedrive", "consumer_id", "c9"}}).Result()
		if err != nil {
			return false
		}
		deadline := time.Now().Add(500 * time.Millisecond)
		for time.Now().Before(deadline) {
			if enqueued(id) {
				return true
			}
			time.Sleep(20 * time.Millisecond)
		}
		return false
	}, 15*time.Second, 10*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
}
