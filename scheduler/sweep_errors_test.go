package scheduler_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// refusingStore answers the claims of some shards with a real Redis error
// reply (as a node does for a slot that migrates).
type refusingStore struct {
	*state.Store
	refuse  map[int]bool
	do      func(ctx context.Context) error
	refused atomic.Int64
}

func (r *refusingStore) ClaimDue(ctx context.Context, idx state.Index, shard int, now time.Time, lease time.Duration, max int) ([]state.Claim, error) {
	if r.refuse[shard] {
		r.refused.Add(1)
		return nil, r.do(ctx)
	}
	return r.Store.ClaimDue(ctx, idx, shard, now, lease, max)
}

// TestSweepGoesOnPastAFailingShard: a shard whose claim fails does not
// starve the others: every other shard's members are enqueued, and the
// sweep returns the failing shard's error.
func TestSweepGoesOnPastAFailingShard(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const n = 200
	b.seedAPIKey(t, 0, n)
	refused := b.store.ShardOf(consumer(0))
	rs := &refusingStore{Store: b.store, refuse: map[int]bool{refused: true},
		do: func(ctx context.Context) error {
			// A real error reply: the command does not exist.
			return b.rdb.Do(ctx, "VAULTFLEET-NO-SUCH-COMMAND").Err()
		}}
	cfg := b.config(fixed(b.t0.Add(time.Minute)))
	cfg.Store, cfg.Batch = rs, 7 // several claims per shard
	s, err := scheduler.New(cfg)
	require.NoError(t, err)
	err = s.Sweep(context.Background())
	require.Error(t, err)
	require.Equal(t, 2, strings.Count(err.Error(), "shard"), "one error per index of the refused shard: %v", err)
	var refusedErr *scheduler.RefusedShardsError
	require.ErrorAs(t, err, &refusedErr)

	want := 0
	for i := range n {
		if b.store.ShardOf(consumer(i)) != refused {
			want++
		}
	}
	require.Less(t, want, n)
	require.Len(t, allTasks(t, b.insp, tasks.QueueLow), want, "every other shard was swept")

	// The shard answers again: the next sweep claims it.
	delete(rs.refuse, refused)
	require.NoError(t, s.Sweep(context.Background()))
	require.Len(t, allTasks(t, b.insp, tasks.QueueLow), n)
}

// TestRunDoesNotBackOffForRefusedShards: a shard Redis keeps refusing
// (a long slot migration) does not slow the loop down for the others: it
// sweeps every tick, without the backoff of a failed sweep.
func TestRunDoesNotBackOffForRefusedShards(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.seedAPIKey(t, 0, 10)
	rs := &refusingStore{Store: b.store, refuse: map[int]bool{0: true},
		do: func(ctx context.Context) error { return b.rdb.Do(ctx, "VAULTFLEET-NO-SUCH-COMMAND").Err() }}
	cfg := b.config(fixed(b.t0.Add(time.Minute)))
	cfg.Store = rs
	s, err := scheduler.New(cfg)
	require.NoError(t, err)
	start := time.Now()
	runScheduler(t, s)
	// Two refused claims (both indexes) per sweep; with the backoff of
	// failed sweeps, twelve sweeps at a 20ms tick would take over 30s.
	require.Eventually(t, func() bool { return rs.refused.Load() >= 24 }, 10*time.Second, 10*time.Millisecond)
	t.Logf("12 sweeps in %v", time.Since(start).Round(time.Millisecond))
	require.Len(t, allTasks(t, b.insp, tasks.QueueLow), 10-countShard(b, 0, 10))
}

func countShard(b *bundle, shard, n int) int {
	k := 0
	for i := range n {
		if b.store.ShardOf(consumer(i)) == shard {
			k++
		}
	}
	return k
}

// TestSweepGivesBackUntriedClaims: when enqueues keep failing the sweep
// gives up, and the claims it never tried are put back at their due time
// at once (not left to their lease); those it tried wait for the lease.
func TestSweepGivesBackUntriedClaims(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const n = 60
	b.seedAPIKey(t, 0, n)
	due := b.t0.Add(safetyNet)
	now := b.t0.Add(time.Minute)
	const lease = time.Minute
	counter := &countingEnqueuer{next: b.client}
	counter.failUntil.Store(true)
	cfg := b.config(fixed(now))
	cfg.Client, cfg.Lease, cfg.EnqueueConcurrency = counter, lease, 1
	s, err := scheduler.New(cfg)
	require.NoError(t, err)
	err = s.Sweep(context.Background())
	require.ErrorContains(t, err, "injected enqueue failure")
	require.EqualValues(t, 3, counter.failed.Load(), "the sweep gives up after three failures in a row")

	leased, back := b.leasedAndBack(t, now.Add(lease), due)
	require.Equal(t, 3, leased, "the tried claims wait for their lease")
	require.Equal(t, n-3, back, "the untried claims are given back")

	// The queue works again: the next sweep enqueues the given-back ones.
	counter.failUntil.Store(false)
	require.NoError(t, s.Sweep(context.Background()))
	require.EqualValues(t, n-3, counter.ok.Load())
}

// leasedAndBack counts the check index's members that wait for their
// lease (at lease) and those given back (at due); any other due time is an
// error.
func (b *bundle) leasedAndBack(t *testing.T, lease, due time.Time) (leased, back int) {
	t.Helper()
	for m, at := range dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck) {
		switch {
		case at.Equal(lease):
			leased++
		case at.Equal(due):
			back++
		default:
			t.Errorf("%s due at %v", m, at)
		}
	}
	return leased, back
}
