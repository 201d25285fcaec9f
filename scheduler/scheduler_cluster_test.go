package scheduler_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// setupCluster builds a bundle on the package's local Redis Cluster (store
// and asynq on it), the store's clock a minute behind the wall, so first
// checks are due by Redis TIME.
func setupCluster(t *testing.T) (*bundle, *redistest.Cluster) {
	t.Helper()
	c := redistest.StartCluster(t)
	b := setupOn(t, c.Client(t), nil)
	b.t0 = time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	return b, c
}

// clusterConfig is a scheduler config without a clock: claims use Redis
// TIME, as in production.
func (b *bundle) clusterConfig() scheduler.Config {
	cfg := b.config(nil)
	cfg.NowFunc = nil
	return cfg
}

// TestSweepOnCluster: on a three-master cluster one sweep claims every
// shard of both indexes and enqueues the validations and the token
// refreshes through asynq on the cluster.
func TestSweepOnCluster(t *testing.T) {
	b, _ := setupCluster(t)
	const n, oauth = 120, 20
	b.seedAPIKey(t, 0, n)
	exp := time.Now().Add(time.Minute) // refresh due 4 minutes ago (window 5m)
	b.seed(t, n, oauth, func(int) (string, state.Input) { return hubspot, oauthInput(exp) })

	s, err := scheduler.New(b.clusterConfig())
	require.NoError(t, err)
	require.NoError(t, s.Sweep(context.Background()))

	// Every connection's first check, the OAuth ones' too.
	low := allTasks(t, b.insp, tasks.QueueLow)
	require.Len(t, low, n+oauth)
	seen := map[string]bool{}
	for _, ti := range low {
		require.Equal(t, tasks.TypeValidate, ti.Type)
		seen[payload(t, ti).ConsumerID] = true
	}
	require.Len(t, seen, n+oauth)
	crit := allTasks(t, b.insp, tasks.QueueCritical)
	refreshes := 0
	for _, ti := range crit {
		if ti.Type == tasks.TypeRefreshToken {
			refreshes++
		}
	}
	require.Equal(t, oauth, refreshes)

	// Claimed and rescheduled: a second sweep finds nothing new.
	require.NoError(t, s.Sweep(context.Background()))
	require.Len(t, allTasks(t, b.insp, tasks.QueueLow), n+oauth)
}

// TestSweepDuringSlotMigration: while the slot of one shard migrates
// between two masters (a record already moved), a sweep finishes every
// other shard and returns the refused shard's error; once the slot has
// moved, the next sweep claims the migrated connection.
func TestSweepDuringSlotMigration(t *testing.T) {
	b, c := setupCluster(t)
	const n = 200
	b.seedAPIKey(t, 0, n)
	moved := consumer(0)
	shard := b.store.ShardOf(moved)
	inShard := 0
	for i := range n {
		if b.store.ShardOf(consumer(i)) == shard {
			inShard++
		}
	}
	require.Less(t, inShard, n)
	recKey := fmt.Sprintf("%s:{s%02d}:conn:%s|%s", state.DefaultPrefix, shard, moved, pipedrive)
	require.EqualValues(t, 1, b.rdb.Exists(context.Background(), recKey).Val(), "the record key layout")

	m := c.BeginMigration(t, recKey)
	m.Move(recKey)
	s, err := scheduler.New(b.clusterConfig())
	require.NoError(t, err)
	err = s.Sweep(context.Background())
	require.ErrorContains(t, err, fmt.Sprintf("claim check shard %d", shard))
	require.ErrorContains(t, err, "TRYAGAIN")
	low := allTasks(t, b.insp, tasks.QueueLow)
	require.Len(t, low, n-inShard, "every other shard was swept")
	for _, ti := range low {
		require.NotEqual(t, moved, payload(t, ti).ConsumerID)
	}

	m.Finish()
	require.NoError(t, s.Sweep(context.Background()))
	low = allTasks(t, b.insp, tasks.QueueLow)
	require.Len(t, low, n)
	found := false
	for _, ti := range low {
		found = found || payload(t, ti).ConsumerID == moved
	}
	require.True(t, found, "the migrated connection is claimed after the migration")
}

// TestRunThroughSlotMigration: a running scheduler (its loop, not one
// sweep) goes on sweeping while a shard's slot migrates, and claims the
// migrated connection soon after the slot has moved: no backoff piles up
// during the migration.
func TestRunThroughSlotMigration(t *testing.T) {
	b, c := setupCluster(t)
	const n = 100
	b.seedAPIKey(t, 0, n)
	moved := consumer(1)
	shard := b.store.ShardOf(moved)
	recKey := fmt.Sprintf("%s:{s%02d}:conn:%s|%s", state.DefaultPrefix, shard, moved, pipedrive)
	m := c.BeginMigration(t, recKey)
	m.Move(recKey)

	s, err := scheduler.New(b.clusterConfig())
	require.NoError(t, err)
	runScheduler(t, s)
	inShard := 0
	for i := range n {
		if b.store.ShardOf(consumer(i)) == shard {
			inShard++
		}
	}
	require.Eventually(t, func() bool { return len(allTasks(t, b.insp, tasks.QueueLow)) == n-inShard },
		10*time.Second, 20*time.Millisecond, "the other shards are swept during the migration")
	time.Sleep(300 * time.Millisecond) // several ticks with the shard refused

	m.Finish()
	start := time.Now()
	require.Eventually(t, func() bool { return len(allTasks(t, b.insp, tasks.QueueLow)) == n },
		5*time.Second, 20*time.Millisecond, "the migrated shard is swept after the migration")
	t.Logf("migrated shard swept %v after the slot moved", time.Since(start).Round(time.Millisecond))
}
