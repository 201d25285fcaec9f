package scheduler_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestSweepBatchesPeriodicChecks: with CheckBatch, the periodic checks a
// sweep claims go out as connection:validate_batch tasks of one
// integration each, at most CheckBatch members, every claimed connection
// in exactly one batch with the due time it was claimed at, and each
// rescheduled one interval on. Refreshes keep one task per connection.
// Two replicas sweeping at once put no connection in two batches.
func TestSweepBatchesPeriodicChecks(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const nPipe, nZoho = 230, 40
	b.seedAPIKey(t, 0, nPipe)
	b.seed(t, nPipe, nZoho, func(int) (string, state.Input) {
		return zoho, state.Input{Credentials: map[string]string{"api_key": "secret"}}
	})
	const nOAuth = 20
	b.seed(t, nPipe+nZoho, nOAuth, func(int) (string, state.Input) {
		return hubspot, oauthInput(b.t0.Add(time.Minute)) // due for refresh too
	})
	now := b.t0.Add(2 * time.Minute)
	var wg sync.WaitGroup
	for range 2 {
		cfg := b.config(fixed(now))
		cfg.CheckBatch = 50
		s, err := scheduler.New(cfg)
		require.NoError(t, err)
		wg.Go(func() { require.NoError(t, s.Sweep(context.Background())) })
	}
	wg.Wait()

	seen := map[string]int{}
	batches, singles := 0, 0
	for _, ti := range allTasks(t, b.insp, tasks.QueueLow) {
		switch ti.Type {
		case tasks.TypeValidateBatch:
			batches++
			p, err := tasks.ParseBatchPayload(ti.Payload)
			require.NoError(t, err)
			require.LessOrEqual(t, len(p.Refs), 50)
			for _, m := range p.Members() {
				require.Equal(t, "crm+"+p.ServiceID, m.ConnectionID)
				require.Equal(t, b.t0.Add(30*time.Second).Unix(), m.Due, "claimed at its due time (the safety net)")
				seen[m.ConsumerID+"|"+m.ConnectionID]++
			}
		case tasks.TypeValidate:
			singles++
			p := payload(t, ti)
			seen[p.ConsumerID+"|"+p.ConnectionID]++
		default:
			t.Fatalf("unexpected task %s in the low queue", ti.Type)
		}
	}
	require.Len(t, seen, nPipe+nOAuth, "every checked connection is claimed and checked (zoho is not checked)")
	for m, n := range seen {
		require.Equal(t, 1, n, "%s is in %d tasks", m, n)
	}
	require.GreaterOrEqual(t, batches, (nPipe+nOAuth)/50)
	require.Less(t, batches+singles, (nPipe+nOAuth)/5, "batched, not one task per check")
	require.Equal(t, nOAuth, pending(t, b.insp, tasks.QueueCritical)+pending(t, b.insp, tasks.QueueDefault),
		"refreshes stay one task per connection")
	for m, at := range dueScores(t, b.rdb, b.store.Shards(), state.IndexCheck) {
		require.True(t, at.After(now.Add(50*time.Minute)), "%s due at %v", m, at)
	}
	t.Logf("%d connections: %d batches, %d single checks", len(seen), batches, singles)
}

// TestCheckBatchBounds: CheckBatch is 1..tasks.MaxBatch.
func TestCheckBatchBounds(t *testing.T) {
	t.Parallel()
	b := setup(t)
	for _, n := range []int{-1, tasks.MaxBatch + 1} {
		cfg := b.config(nil)
		cfg.CheckBatch = n
		_, err := scheduler.New(cfg)
		require.ErrorContains(t, err, "check batch")
	}
}

// TestSweepGivesBackUntriedBatches: when batch enqueues keep failing the
// sweep gives up; the members of the batches it never tried are put back
// at their due time at once, those of the batches it tried wait for the
// lease, and the next sweep checks every one of them.
func TestSweepGivesBackUntriedBatches(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const n = 200
	b.seedAPIKey(t, 0, n)
	due := b.t0.Add(safetyNet)
	now := b.t0.Add(time.Minute)
	const lease = time.Minute
	counter := &countingEnqueuer{next: b.client}
	counter.failUntil.Store(true)
	cfg := b.config(fixed(now))
	cfg.Client, cfg.Lease, cfg.EnqueueConcurrency, cfg.CheckBatch = counter, lease, 1, 20
	s, err := scheduler.New(cfg)
	require.NoError(t, err)
	require.ErrorContains(t, s.Sweep(context.Background()), "injected enqueue failure")
	require.EqualValues(t, 3, counter.failed.Load())

	leased, back := b.leasedAndBack(t, now.Add(lease), due)
	require.Equal(t, 3*20, leased, "the members of the three tried batches wait for their lease")
	require.Equal(t, n-3*20, back, "the others are given back")

	counter.failUntil.Store(false)
	require.NoError(t, s.Sweep(context.Background()))
	members := 0
	for _, ti := range allTasks(t, b.insp, tasks.QueueLow) {
		p, err := tasks.ParseBatchPayload(ti.Payload)
		require.NoError(t, err)
		members += len(p.Refs)
	}
	require.Equal(t, n-3*20, members)
}
