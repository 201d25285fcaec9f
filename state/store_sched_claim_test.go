package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestClaimDueAtRedisTime: a zero now claims at the Redis server's TIME,
// not at any process's clock: a member due by TIME is claimed, one due
// later by TIME is not, and the lease is TIME+lease.
func TestClaimDueAtRedisTime(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 1 })
	ctx := context.Background()
	wall := time.Now()
	late := Ref{ConsumerID: "late", ConnectionID: "hris+bamboohr"}
	early := Ref{ConsumerID: "early", ConnectionID: "hris+bamboohr"}
	b.clock.Advance(wall.Add(time.Hour).Sub(b.clock.Now())) // first check due an hour from now
	_, err := b.store.Put(ctx, late, bambooInput("k"), 0)
	require.NoError(t, err)
	b.clock.Advance(wall.Add(-time.Minute).Sub(b.clock.Now())) // first check due 30s ago
	_, err = b.store.Put(ctx, early, bambooInput("k"), 0)
	require.NoError(t, err)

	const lease = 2 * time.Minute
	cs, err := b.store.ClaimDue(ctx, IndexCheck, 0, time.Time{}, lease, 10)
	require.NoError(t, err)
	require.Len(t, cs, 1)
	c := cs[0]
	require.Equal(t, early, c.Ref)
	tm, err := b.rdb.Time(ctx).Result()
	require.NoError(t, err)
	require.WithinDuration(t, tm, c.At, 2*time.Second, "claimed at Redis TIME")
	require.Equal(t, c.At.Add(lease), c.Lease)
	at, ok, err := b.store.DueAt(ctx, IndexCheck, early)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, c.Lease, at, "pushed to TIME+lease")
	require.Equal(t, "bamboohr", c.ServiceID)
	require.Equal(t, Added, c.State)

	// Leased: not claimed again before TIME reaches the lease.
	cs, err = b.store.ClaimDue(ctx, IndexCheck, 0, time.Time{}, lease, 10)
	require.NoError(t, err)
	require.Empty(t, cs)
}
