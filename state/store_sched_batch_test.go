package state

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestRescheduleBatch: claims across shards are rescheduled in one call
// per shard; a member written since its claim keeps the write's due time.
func TestRescheduleBatch(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 4 })
	ctx := context.Background()
	const n = 40
	for i := range n {
		_, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("rb%03d", i), ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0)
		require.NoError(t, err)
	}
	now := storeT0.Add(safetyNet)
	var claims []Claim
	for sh := range 4 {
		cs, err := b.store.ClaimDue(ctx, IndexCheck, sh, now, time.Minute, 1000)
		require.NoError(t, err)
		claims = append(claims, cs...)
	}
	require.Len(t, claims, n)
	shards := map[int]bool{}
	for _, c := range claims {
		shards[b.store.ShardOf(c.Ref.ConsumerID)] = true
	}
	require.Greater(t, len(shards), 1, "the batch spans shards")

	// One of them is written after the claim: its due time must stand.
	b.clock.Advance(5 * time.Minute) // not onto the lease score by chance
	written := claims[3].Ref
	_, err := b.store.Patch(ctx, written, Input{Credentials: map[string]string{"api_key": "rotated"}}, 0)
	require.NoError(t, err)
	wantWritten, _, err := b.store.DueAt(ctx, IndexCheck, written)
	require.NoError(t, err)

	next := make([]time.Time, len(claims))
	for i := range claims {
		next[i] = now.Add(time.Hour + time.Duration(i)*time.Second)
	}
	applied, err := b.store.RescheduleBatch(ctx, IndexCheck, claims, next)
	require.NoError(t, err)
	require.Equal(t, n-1, applied)
	for i, c := range claims {
		at, ok, err := b.store.DueAt(ctx, IndexCheck, c.Ref)
		require.NoError(t, err)
		require.True(t, ok)
		if c.Ref == written {
			require.Equal(t, wantWritten, at, "the write since the claim wins")
			continue
		}
		require.Equal(t, next[i], at, c.Ref)
	}

	_, err = b.store.RescheduleBatch(ctx, IndexCheck, claims, next[:1])
	require.ErrorContains(t, err, "claims but")
	_, err = b.store.RescheduleBatch(ctx, "nope", claims[:1], next[:1])
	require.Error(t, err)
}
