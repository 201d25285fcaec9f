package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestReauthorizationSafetyNetEnds: an OAuth re-authorization (new
// tokens, a new revision, the state stays callable) puts the safety net
// 30 s out; the verdict of the validation the notifier enqueued replaces
// it with the next periodic check, so no second check follows 30 s after
// the re-authorization.
func TestReauthorizationSafetyNetEnds(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ref := refHubSpot
	in := func(at, rt string) Input {
		return Input{Credentials: map[string]string{"access_token": at, "refresh_token": rt,
			"expires_at": b.clock.Now().Add(2 * time.Hour).Format(time.RFC3339)}}
	}
	ch, err := b.store.Put(ctx, ref, in("at", "rt"), 0)
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(ctx, ref, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)

	b.clock.Advance(10 * time.Minute)
	ch, err = b.store.Put(ctx, ref, in("at2", "rt2"), 0)
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	require.Equal(t, []Task{CredentialsTask(ch.After)}, TasksAfterWrite(ch.Before, ch.After, mustIntegration(t, b.store, ref), b.clock.Now()))
	at, ok, err := b.store.DueAt(ctx, IndexCheck, ref)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, b.clock.Now().Add(safetyNet), at, "the safety net of the notifier's task")

	b.clock.Advance(2 * time.Second)
	ch, err = b.store.ApplyVerdict(ctx, ref, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	at, ok, err = b.store.DueAt(ctx, IndexCheck, ref)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, NextCheckAt(ref, mustIntegration(t, b.store, ref), Callable, b.clock.Now(), DefaultJitter).UnixMilli(), at.UnixMilli(),
		"the next periodic check, one interval after the verdict")
}
