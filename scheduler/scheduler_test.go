package scheduler_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func fixed(t time.Time) func() time.Time { return func() time.Time { return t } }

func TestNewValidatesConfig(t *testing.T) {
	t.Parallel()
	b := setup(t)
	base := func() scheduler.Config { return b.config(nil) }
	tests := map[string]struct {
		edit    func(*scheduler.Config)
		wantErr string
	}{
		"Defaults":          {edit: func(*scheduler.Config) {}},
		"NoStore":           {edit: func(c *scheduler.Config) { c.Store = nil }, wantErr: "Store is required"},
		"NoCatalog":         {edit: func(c *scheduler.Config) { c.Catalog = nil }, wantErr: "Catalog is required"},
		"NoClient":          {edit: func(c *scheduler.Config) { c.Client = nil }, wantErr: "Client is required"},
		"ShortLease":        {edit: func(c *scheduler.Config) { c.Lease = 500 * time.Millisecond }, wantErr: "lease must be at least 1s"},
		"HugeJitter":        {edit: func(c *scheduler.Config) { c.Jitter = 0.6 }, wantErr: "jitter must be between 0 and 0.5"},
		"NegativeBatch":     {edit: func(c *scheduler.Config) { c.Batch = -1 }, wantErr: "batch must be positive"},
		"NegativeTick":      {edit: func(c *scheduler.Config) { c.Tick = -time.Second }, wantErr: "tick must be positive"},
		"NoJitterNoLimit":   {edit: func(c *scheduler.Config) { c.Jitter, c.MaxLowPending = -1, -1 }},
		"NoInspector":       {edit: func(c *scheduler.Config) { c.Inspector = nil }},
		"NegativeParallel":  {edit: func(c *scheduler.Config) { c.EnqueueConcurrency = -2 }, wantErr: "enqueue concurrency must be positive"},
		"SharedRegisterer":  {edit: func(c *scheduler.Config) { c.Registerer = sharedReg }},
		"SharedRegisterer2": {edit: func(c *scheduler.Config) { c.Registerer = sharedReg }},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			cfg := base()
			tc.edit(&cfg)
			s, err := scheduler.New(cfg)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				require.Nil(t, s)
				return
			}
			require.NoError(t, err)
			require.NotNil(t, s)
		})
	}
}

var sharedReg = prometheus.NewRegistry()

// TestReplicasEnqueueOnce runs 1, 2 and 3 schedulers at once over 10,000
// due connections: each is enqueued exactly once for its due time, by
// whichever replica claimed it, with no task id conflict (claims alone keep
// replicas apart), and is rescheduled about an interval later; also with
// batched reschedules.
func TestReplicasEnqueueOnce(t *testing.T) {
	const n = 10_000
	for _, tc := range []struct {
		replicas int
		batched  bool
	}{{1, false}, {2, false}, {3, false}, {3, true}} {
		name := fmt.Sprintf("Replicas%d", tc.replicas)
		if tc.batched {
			name += "Batched"
		}
		t.Run(name, func(t *testing.T) {
			// Not parallel: nothing else runs, so every goroutine the
			// schedulers started must be gone once they are stopped.
			defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
			b := setup(t)
			b.seedAPIKey(t, 0, n)
			var st scheduler.Store = perClaimStore{b.store}
			if tc.batched {
				st = newBatchStore(t, b.store, b.rdb)
			}
			now := b.t0.Add(time.Minute)
			counter := &countingEnqueuer{next: b.client}
			reg := prometheus.NewRegistry()
			var stops []context.CancelFunc
			claimCalls := make([]*atomic.Int64, tc.replicas)
			for i := range tc.replicas {
				claimCalls[i] = new(atomic.Int64)
				cfg := b.config(fixed(now))
				cfg.Store, cfg.Client, cfg.Registerer = countClaims(st, claimCalls[i]), counter, reg
				cfg.Batch = 100 // several claims per shard, so that replicas interleave
				s, err := scheduler.New(cfg)
				require.NoError(t, err)
				stops = append(stops, runScheduler(t, s))
			}
			require.Eventually(t, func() bool { return counter.ok.Load()+counter.dup.Load() >= n },
				2*time.Minute, 20*time.Millisecond)
			// Let every replica claim a few more times, over every shard of
			// both indexes: nothing more comes.
			after := make([]int64, len(claimCalls))
			for i, c := range claimCalls {
				after[i] = c.Load()
			}
			require.Eventually(t, func() bool {
				for i, c := range claimCalls {
					if c.Load() < after[i]+int64(3*2*b.store.Shards()) {
						return false
					}
				}
				return true
			}, time.Minute, 5*time.Millisecond, "every replica sweeps again")
			for _, stop := range stops {
				stop()
			}
			require.EqualValues(t, n, counter.ok.Load(), "enqueued")
			require.Zero(t, counter.dup.Load(), "task id conflicts: two replicas claimed the same member")
			require.Zero(t, counter.failed.Load())

			ts := allTasks(t, b.insp, tasks.QueueLow)
			require.Len(t, ts, n)
			seen := make(map[string]bool, n)
			wantKey := unix(b.t0.Add(safetyNet))
			for _, ti := range ts {
				p := payload(t, ti)
				require.False(t, seen[p.ConsumerID], "consumer %s enqueued twice", p.ConsumerID)
				seen[p.ConsumerID] = true
				require.Equal(t, tasks.TypeValidate, ti.Type)
				require.Equal(t, tasks.ReasonScheduled, p.Reason)
				require.Equal(t, wantKey, p.Key)
				require.Equal(t, tasks.TaskID(tasks.TypeValidate, p.ConsumerID, pipedrive, wantKey), ti.ID)
			}
			due := dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck)
			require.Len(t, due, n)
			for m, at := range due {
				require.False(t, at.Before(now.Add(54*time.Minute)), "%s due at %v, before the jittered interval", m, at)
			}
			require.EqualValues(t, n, metric(t, reg, "vaultfleet_scheduler_enqueued_total", "task", "validate"))
			require.EqualValues(t, n, metric(t, reg, "vaultfleet_scheduler_claims_total", "index", "check"))
			require.Zero(t, metric(t, reg, "vaultfleet_scheduler_enqueue_errors_total", "index", "check"))
		})
	}
}

// blockingEnqueuer stands for a scheduler that dies between its claim and
// its enqueue: every enqueue blocks until release, then fails.
type blockingEnqueuer struct {
	entered chan struct{}
	release chan struct{}
}

func (e *blockingEnqueuer) EnqueueContext(ctx context.Context, _ *asynq.Task, _ ...asynq.Option) (*asynq.TaskInfo, error) {
	select {
	case e.entered <- struct{}{}:
	default:
	}
	select {
	case <-e.release:
		return nil, errors.New("scheduler process killed")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func TestKilledAfterClaimIsEnqueuedAfterLease(t *testing.T) {
	t.Parallel()
	const n = 50
	const lease = 30 * time.Second
	b := setup(t)
	b.seedAPIKey(t, 0, n)
	now := b.t0.Add(time.Minute)

	dead := &blockingEnqueuer{entered: make(chan struct{}, 1), release: make(chan struct{})}
	cfgA := b.config(fixed(now))
	cfgA.Client, cfgA.Lease = dead, lease
	a, err := scheduler.New(cfgA)
	require.NoError(t, err)
	sweptA := make(chan error, 1)
	go func() { sweptA <- a.Sweep(context.Background()) }()
	<-dead.entered
	// A has claimed every member: all carry its lease score.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		for m, at := range dueScores(c, b.rdb, b.store.Shards(), state.IndexCheck) {
			assert.True(c, at.Equal(now.Add(lease)), "%s carries A's lease score", m)
		}
	}, 10*time.Second, 10*time.Millisecond)

	clk := newClock(now)
	counter := &countingEnqueuer{next: b.client}
	cfgB := b.config(clk.Now)
	cfgB.Client, cfgB.Lease = counter, lease
	bs, err := scheduler.New(cfgB)
	require.NoError(t, err)

	// While A holds the lease, B finds nothing due.
	require.NoError(t, bs.Sweep(context.Background()))
	require.Zero(t, counter.ok.Load())
	clk.Add(lease - time.Second)
	require.NoError(t, bs.Sweep(context.Background()))
	require.Zero(t, counter.ok.Load())

	// After the lease B claims and enqueues everything A had taken.
	clk.Add(2 * time.Second)
	require.NoError(t, bs.Sweep(context.Background()))
	require.EqualValues(t, n, counter.ok.Load())
	ts := allTasks(t, b.insp, tasks.QueueLow)
	require.Len(t, ts, n)
	for _, ti := range ts {
		require.Equal(t, unix(now.Add(lease)), payload(t, ti).Key, "the key is the due time B claimed: A's lease")
	}

	// A's enqueues fail at last (its process is gone): it neither enqueues
	// nor moves B's reschedules.
	close(dead.release)
	require.Error(t, <-sweptA)
	require.Len(t, allTasks(t, b.insp, tasks.QueueLow), n)
	for m, at := range dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck) {
		require.True(t, at.After(clk.Now().Add(50*time.Minute)), "%s due at %v", m, at)
	}
}

// TestJitterSpreadsDueTimes: 10,000 connections due at once, with one
// interval (1h), are spread over ±10%: no bucket of a 20-bucket histogram
// over the window holds more than twice the mean.
func TestJitterSpreadsDueTimes(t *testing.T) {
	t.Parallel()
	const n = 10_000
	b := setup(t)
	b.seedAPIKey(t, 0, n)
	now := b.t0.Add(time.Minute)
	s, err := scheduler.New(b.config(fixed(now)))
	require.NoError(t, err)
	require.NoError(t, s.Sweep(context.Background()))
	require.Equal(t, n, pending(t, b.insp, tasks.QueueLow))

	lo, hi := now.Add(54*time.Minute), now.Add(66*time.Minute)
	var hist [20]int
	due := dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck)
	require.Len(t, due, n)
	for m, at := range due {
		require.False(t, at.Before(lo) || !at.Before(hi), "%s due at %v, outside [%v, %v)", m, at, lo, hi)
		hist[int(at.Sub(lo)*20/hi.Sub(lo))]++
	}
	mean := n / 20
	for i, c := range hist {
		require.LessOrEqual(t, c, 2*mean, "bucket %d holds %d (mean %d): %v", i, c, mean, hist)
		require.Positive(t, c, "bucket %d is empty: %v", i, hist)
	}
	t.Logf("20-bucket histogram over [now+54m, now+66m): %v (mean %d)", hist, mean)
}

// TestJitterBounds: the next check is the interval spread by the policy's
// per-connection jitter (state.Jitter), within ±Jitter, whatever RandFunc
// returns.
func TestJitterBounds(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tests := map[string]struct {
		jitter float64
		rand   float64
	}{
		"Ten":      {jitter: 0.1, rand: 0},
		"Twenty":   {jitter: 0.2, rand: 0.75},
		"NoJitter": {jitter: -1, rand: 0.99},
	}
	i := 0
	for name, tc := range tests {
		b.seedAPIKey(t, i, 1)
		now := b.t0.Add(time.Minute + time.Duration(i)*time.Second)
		cfg := b.config(fixed(now))
		cfg.Jitter, cfg.RandFunc = tc.jitter, func() float64 { return tc.rand }
		s, err := scheduler.New(cfg)
		require.NoError(t, err)
		require.NoError(t, s.Sweep(context.Background()), name)
		ref := state.Ref{ConsumerID: consumer(i), ConnectionID: pipedrive}
		at := dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck)[ref.String()]
		spread := max(tc.jitter, 0)
		want := now.Add(state.Jitter(ref, time.Hour, spread))
		require.Equal(t, want.UnixMilli(), at.UnixMilli(), name)
		lo, hi := now.Add(time.Duration(float64(time.Hour)*(1-spread))), now.Add(time.Duration(float64(time.Hour)*(1+spread)))
		require.False(t, at.Before(lo), "%s: %v before %v", name, at, lo)
		require.True(t, at.Before(hi) || spread == 0 && at.Equal(hi), "%s: %v not before %v", name, at, hi)
		i++
	}
}

// TestDisabledSkippedReenabledAtOnce: a disabled connection is never
// enqueued by a sweep; enabling it enqueues a critical validation at once
// through the Notifier (and a critical refresh if its token has expired).
func TestDisabledSkippedReenabledAtOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	notifier := scheduler.NewNotifier(b.client, b.cat)
	key := map[string]string{"api_key": "secret"}
	refA := state.Ref{ConsumerID: "alice", ConnectionID: pipedrive} // created disabled
	refB := state.Ref{ConsumerID: "bob", ConnectionID: pipedrive}   // created, then disabled
	refC := state.Ref{ConsumerID: "carol", ConnectionID: pipedrive} // enabled all along
	refD := state.Ref{ConsumerID: "dave", ConnectionID: hubspot}    // oauth, disabled, token expired

	put := func(ref state.Ref, in state.Input) state.Change {
		ch, err := b.store.Put(ctx, ref, in, 0)
		require.NoError(t, err)
		require.NoError(t, notifier.Notify(ctx, ch))
		return ch
	}
	put(refA, state.Input{Enabled: ptr(false), Credentials: key})
	put(refB, state.Input{Credentials: key})
	put(refC, state.Input{Credentials: key})
	expiry := b.t0.Add(-time.Hour)
	in := oauthInput(expiry)
	in.Enabled = ptr(false)
	put(refD, in)
	chB, err := b.store.Patch(ctx, refB, state.Input{Enabled: ptr(false)}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, chB))
	require.Equal(t, 2, pending(t, b.insp, tasks.QueueCritical), "B and C at creation, nothing for the disabled ones")

	due := dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck)
	require.NotContains(t, due, refA.String())
	require.NotContains(t, due, refB.String())
	require.NotContains(t, due, refD.String())
	require.NotContains(t, dueScores(t, b.rdb, b.store.Shards(), state.IndexRefresh), refD.String())

	s, err := scheduler.New(b.config(fixed(b.t0.Add(2 * time.Hour))))
	require.NoError(t, err)
	require.NoError(t, s.Sweep(ctx))
	ts := allTasks(t, b.insp, tasks.QueueLow)
	require.Len(t, ts, 1)
	require.Equal(t, "carol", payload(t, ts[0]).ConsumerID)
	require.Zero(t, pending(t, b.insp, tasks.QueueDefault))

	// Enabling A: a critical validation right away, keyed by the version.
	start := time.Now()
	chA, err := b.store.Patch(ctx, refA, state.Input{Enabled: ptr(true)}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, chA))
	ti, err := b.insp.GetTaskInfo(tasks.QueueCritical,
		tasks.TaskID(tasks.TypeValidate, "alice", pipedrive, fmt.Sprintf("en%d", chA.After.Version)))
	require.NoError(t, err)
	require.Less(t, time.Since(start), time.Second)
	require.Equal(t, tasks.ReasonEnabled, payload(t, ti).Reason)
	require.Contains(t, dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck), refA.String(), "due again for the periodic sweep")

	// Enabling D, whose token has expired: a critical refresh as well.
	chD, err := b.store.Patch(ctx, refD, state.Input{Enabled: ptr(true)}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, chD))
	ti, err = b.insp.GetTaskInfo(tasks.QueueCritical,
		tasks.TaskID(tasks.TypeValidate, "dave", hubspot, fmt.Sprintf("en%d", chD.After.Version)))
	require.NoError(t, err)
	require.Equal(t, tasks.ReasonEnabled, payload(t, ti).Reason)
	ti, err = b.insp.GetTaskInfo(tasks.QueueCritical, tasks.RefreshTaskID("dave", hubspot))
	require.NoError(t, err)
	require.Equal(t, tasks.ReasonExpired, payload(t, ti).Reason)

	// Notifying the same change twice enqueues nothing more.
	require.NoError(t, notifier.Notify(ctx, chD))
	require.Equal(t, 5, pending(t, b.insp, tasks.QueueCritical))
}

// TestCredentialsWriteEnqueuesCriticalValidation: a consumer who enters
// credentials gets a critical validation within a second; one per
// credentials revision.
func TestCredentialsWriteEnqueuesCriticalValidation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	notifier := scheduler.NewNotifier(b.client, b.cat)
	ref := state.Ref{ConsumerID: "erin", ConnectionID: pipedrive}

	start := time.Now()
	ch, err := b.store.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k1"}}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, ch))
	ti, err := b.insp.GetTaskInfo(tasks.QueueCritical,
		tasks.TaskID(tasks.TypeValidate, "erin", pipedrive, fmt.Sprintf("rev%d", ch.After.Revision)))
	require.NoError(t, err)
	require.Less(t, time.Since(start), time.Second, "write to task in Redis")
	require.Equal(t, tasks.ReasonCredentialsChanged, payload(t, ti).Reason)

	// New credentials: a new revision, a new task.
	ch2, err := b.store.Patch(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k2"}}, 0)
	require.NoError(t, err)
	require.NotEqual(t, ch.After.Revision, ch2.After.Revision)
	require.NoError(t, notifier.Notify(ctx, ch2))
	_, err = b.insp.GetTaskInfo(tasks.QueueCritical,
		tasks.TaskID(tasks.TypeValidate, "erin", pipedrive, fmt.Sprintf("rev%d", ch2.After.Revision)))
	require.NoError(t, err)

	// The same credentials again: no new revision, no task.
	ch3, err := b.store.Patch(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k2"}}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, ch3))
	require.Equal(t, 2, pending(t, b.insp, tasks.QueueCritical))

	// An integration that is not checked: nothing.
	ch4, err := b.store.Put(ctx, state.Ref{ConsumerID: "erin", ConnectionID: zoho},
		state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
	require.NoError(t, err)
	require.NoError(t, notifier.Notify(ctx, ch4))
	require.Equal(t, 2, pending(t, b.insp, tasks.QueueCritical))
}

// TestRefreshClaims: refreshes go to the critical queue under one task id
// per connection; refresh claims are not rescheduled (the store does that
// when tokens are stored), and a claim that comes back after its lease
// while the refresh still retries adds no second chain; a chain that asynq
// archived is replaced; integrations that are not checked get nothing.
func TestRefreshClaims(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	expiry := b.t0.Add(10 * time.Minute) // refresh due at expiry - 5m
	b.seed(t, 0, 10, func(int) (string, state.Input) { return hubspot, oauthInput(expiry) })
	b.seed(t, 10, 5, func(int) (string, state.Input) { return hubspot, oauthInput(expiry.Add(2 * time.Hour)) })
	b.seed(t, 20, 3, func(int) (string, state.Input) {
		return zoho, state.Input{Credentials: map[string]string{"api_key": "k"}}
	})

	clk := newClock(b.t0.Add(6 * time.Minute)) // refresh overdue by 1m
	cfg := b.config(clk.Now)
	cfg.MaxLowPending = -1
	s, err := scheduler.New(cfg)
	require.NoError(t, err)
	require.NoError(t, s.Sweep(ctx))
	ts := allTasks(t, b.insp, tasks.QueueCritical)
	require.Len(t, ts, 10)
	for _, ti := range ts {
		require.Equal(t, tasks.TypeRefreshToken, ti.Type)
		p := payload(t, ti)
		require.Equal(t, tasks.RefreshTaskID(p.ConsumerID, p.ConnectionID), ti.ID)
		require.Equal(t, tasks.ReasonScheduled, p.Reason)
		require.Equal(t, unix(expiry.Add(-5*time.Minute)), p.Key)
	}
	require.Equal(t, 15, pending(t, b.insp, tasks.QueueLow), "checks of the hubspot connections, none of zoho")
	refresh := dueScores(t, b.rdb, b.store.Shards(), state.IndexRefresh)
	for i := range 10 {
		require.Equal(t, clk.Now().Add(scheduler.DefaultLease).UnixMilli(), refresh[consumer(i)+"|"+hubspot].UnixMilli(),
			"refresh claims keep their lease")
	}
	for i := 20; i < 23; i++ {
		at, ok := dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck)[consumer(i)+"|"+zoho]
		if ok { // the store may not index unchecked integrations at all
			require.True(t, at.After(clk.Now().Add(50*time.Minute)), "unchecked integration pushed back")
		}
	}

	// The refreshes still retry and the leases run out, again and again:
	// each claim comes back, and each finds its chain still there.
	for range 3 {
		clk.Add(scheduler.DefaultLease + time.Second)
		require.NoError(t, s.Sweep(ctx))
	}
	ts = allTasks(t, b.insp, tasks.QueueCritical)
	require.Len(t, ts, 10, "one refresh chain per connection, however many leases")
	for _, ti := range ts {
		require.Equal(t, tasks.ReasonScheduled, payload(t, ti).Reason, "the first chain, not a new one")
	}

	// asynq archived one chain (retries exhausted): the next due claim
	// replaces it instead of being refused by its task id for good.
	archived := ts[0]
	require.NoError(t, b.insp.ArchiveTask(tasks.QueueCritical, archived.ID))
	clk.Add(scheduler.DefaultLease + time.Second)
	require.NoError(t, s.Sweep(ctx))
	info, err := b.insp.GetTaskInfo(tasks.QueueCritical, archived.ID)
	require.NoError(t, err)
	require.Equal(t, asynq.TaskStatePending, info.State, "a new chain replaced the archived one")
	require.Len(t, allTasks(t, b.insp, tasks.QueueCritical), 10)
}

// TestBackpressure: while the low queue is full, periodic checks wait and
// refreshes go on; once it drains, checks resume.
func TestBackpressure(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	b := setup(t)
	b.seedAPIKey(t, 0, 50)
	expiry := b.t0.Add(10 * time.Minute)
	b.seed(t, 100, 20, func(int) (string, state.Input) { return hubspot, oauthInput(expiry) })
	for i := range 10 {
		_, err := b.client.Enqueue(asynq.NewTask("test:filler", []byte{byte(i)}), asynq.Queue(tasks.QueueLow))
		require.NoError(t, err)
	}
	rec := &logRecorder{}
	now := b.t0.Add(6 * time.Minute)
	cfg := b.config(fixed(now))
	cfg.MaxLowPending, cfg.Logger = 10, slog.New(rec)
	reg := cfg.Registerer.(*prometheus.Registry)
	s, err := scheduler.New(cfg)
	require.NoError(t, err)

	for range 3 {
		require.NoError(t, s.Sweep(ctx))
	}
	require.True(t, s.Paused())
	require.Equal(t, 10, pending(t, b.insp, tasks.QueueLow), "no periodic check enqueued")
	require.Equal(t, 20, pending(t, b.insp, tasks.QueueCritical), "refreshes went through")
	require.Equal(t, 1, rec.count("periodic checks paused"), "logged once per episode")
	require.EqualValues(t, 1, metric(t, reg, "vaultfleet_scheduler_backpressure"))
	require.Zero(t, metric(t, reg, "vaultfleet_scheduler_claims_total", "index", "check"))
	require.EqualValues(t, 20, metric(t, reg, "vaultfleet_scheduler_claims_total", "index", "refresh"))
	require.EqualValues(t, (6*time.Minute - safetyNet).Seconds(),
		metric(t, reg, "vaultfleet_scheduler_lag_seconds", "index", "check"), "checks wait: lag grows")
	require.Len(t, dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck), 70)

	_, err = b.insp.DeleteAllPendingTasks(tasks.QueueLow)
	require.NoError(t, err)
	require.NoError(t, s.Sweep(ctx))
	require.False(t, s.Paused())
	require.Equal(t, 70, pending(t, b.insp, tasks.QueueLow))
	require.Equal(t, 1, rec.count("periodic checks resumed"))
	require.Zero(t, metric(t, reg, "vaultfleet_scheduler_backpressure"))
	require.EqualValues(t, 70, metric(t, reg, "vaultfleet_scheduler_enqueued_total", "task", "validate"))
	require.EqualValues(t, 20, metric(t, reg, "vaultfleet_scheduler_enqueued_total", "task", "refresh_token"))
	require.EqualValues(t, 1, metric(t, reg, "vaultfleet_scheduler_sweep_duration_seconds", "index", "check"), "observed once checks ran")

	require.NoError(t, s.Sweep(ctx))
	require.Zero(t, metric(t, reg, "vaultfleet_scheduler_lag_seconds", "index", "check"), "nothing overdue")
}

// recordingStore notes when each sweep starts (its first store call) and
// how it ended.
type recordingStore struct {
	*state.Store
	mu     sync.Mutex
	starts []time.Time
	fails  []bool
}

func (r *recordingStore) OldestDue(ctx context.Context, idx state.Index, now time.Time) (time.Time, bool, error) {
	at, ok, err := r.Store.OldestDue(ctx, idx, now)
	if idx == state.IndexRefresh {
		r.mu.Lock()
		r.starts = append(r.starts, time.Now())
		r.fails = append(r.fails, err != nil)
		r.mu.Unlock()
	}
	return at, ok, err
}

// failingSweeps returns the start times of the failed sweeps since from.
func (r *recordingStore) failingSweeps(from time.Time) []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []time.Time
	for i, at := range r.starts {
		if r.fails[i] && !at.Before(from) {
			out = append(out, at)
		}
	}
	return out
}

// TestRedisOutage: when the queue's Redis goes away, claims whose enqueue
// failed come back after their lease; when the store's Redis goes away,
// the loop logs, backs off exponentially and resumes. Nothing is lost and
// nothing is enqueued twice.
func TestRedisOutage(t *testing.T) {
	t.Parallel()
	storeSrv, queueSrv := redistest.New(t), redistest.New(t)
	if !storeSrv.Real {
		t.Skip("needs redis-server")
	}
	storeRDB := redis.NewClient(&redis.Options{Addr: storeSrv.Addr, MaxRetries: -1, DialerRetries: 1})
	queueRDB := redis.NewClient(&redis.Options{Addr: queueSrv.Addr, MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = storeRDB.Close(); _ = queueRDB.Close() })
	b := setupOn(t, storeRDB, queueRDB)
	b.seedAPIKey(t, 0, 200)

	const lease = 10 * time.Second
	const tick = 50 * time.Millisecond
	clk := newClock(b.t0.Add(time.Minute))
	rec := &logRecorder{}
	rs := &recordingStore{Store: b.store}
	counter := &countingEnqueuer{next: b.client}
	cfg := b.config(clk.Now)
	cfg.Store, cfg.Client, cfg.Logger, cfg.Lease, cfg.Tick = rs, counter, slog.New(rec), lease, tick
	reg := cfg.Registerer.(*prometheus.Registry)
	s, err := scheduler.New(cfg)
	require.NoError(t, err)

	// Phase 1: the queue's Redis is down. Claims work, enqueues fail.
	queueSrv.Stop()
	stop := runScheduler(t, s)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.GreaterOrEqual(c, metric(c, reg, "vaultfleet_scheduler_enqueue_errors_total", "index", "check"), 3.0)
		assert.GreaterOrEqual(c, rec.count("sweep failed"), 1)
	}, 20*time.Second, 10*time.Millisecond)
	require.Equal(t, 1, rec.count("enqueue failed"), "rate-limited")
	require.Zero(t, counter.ok.Load())

	queueSrv.Restart(t)
	clk.Add(lease + time.Second) // the failed claims are due again
	require.Eventually(t, func() bool { return counter.ok.Load() >= 200 }, 30*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return rec.count("sweeps resumed") >= 1 }, 5*time.Second, 10*time.Millisecond)

	// Phase 2: the store's Redis is down. Sweeps fail and back off.
	down := time.Now()
	storeSrv.Stop()
	require.Eventually(t, func() bool { return len(rs.failingSweeps(down)) >= 6 }, 30*time.Second, 10*time.Millisecond)
	// The backoff is jittered, so neighbouring gaps may shrink; over six
	// failures it must have grown well beyond the first gap.
	fails := rs.failingSweeps(down)
	g := gaps(fails)
	require.Greater(t, g[len(g)-1], 2*g[0], "backoff grows: gaps %v", g)
	t.Logf("gaps between failed sweeps: %v", gaps(fails))
	resumedBefore := rec.count("sweeps resumed")

	// Redis comes back (empty: redistest restarts without data); new
	// connections are picked up.
	storeSrv.Restart(t)
	b.seedAPIKey(t, 1000, 100)
	require.Eventually(t, func() bool { return counter.ok.Load() >= 300 }, 60*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return rec.count("sweeps resumed") > resumedBefore }, 5*time.Second, 10*time.Millisecond)
	stop()

	require.EqualValues(t, 300, counter.ok.Load())
	require.Zero(t, counter.dup.Load())
	seen := map[string]bool{}
	for _, ti := range allTasks(t, b.insp, tasks.QueueLow) {
		p := payload(t, ti)
		require.False(t, seen[p.ConsumerID], "%s enqueued twice", p.ConsumerID)
		seen[p.ConsumerID] = true
	}
	require.Len(t, seen, 300)
}

func gaps(ts []time.Time) []time.Duration {
	var out []time.Duration
	for i := 1; i < len(ts); i++ {
		out = append(out, ts[i].Sub(ts[i-1]).Round(time.Millisecond))
	}
	return out
}
