package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestLatestEvents(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	none, err := b.store.LatestEvents(ctx, 5)
	require.NoError(t, err)
	require.Empty(t, none)

	_, err = b.store.Put(ctx, refBamboo, bambooInput("key-one"), 0)
	require.NoError(t, err)
	c, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	b.clock.Advance(time.Second)
	_, err = b.store.ApplyVerdict(ctx, refBamboo, c.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, CheckedAt: b.clock.Now()})
	require.NoError(t, err)

	all, err := b.store.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(all), 2)
	latest, err := b.store.LatestEvents(ctx, 1)
	require.NoError(t, err)
	require.Len(t, latest, 1)
	require.Equal(t, all[len(all)-1].ID, latest[0].ID, "newest first")
	require.Equal(t, EventCallable, latest[0].Type)
	both, err := b.store.LatestEvents(ctx, 100)
	require.NoError(t, err)
	require.Len(t, both, len(all))
	require.Equal(t, all[0].ID, both[len(both)-1].ID)
}
