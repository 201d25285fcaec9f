package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestApplyVerdictFrom: starting from the caller's copy gives the same
// result as ApplyVerdict, also when the record moved since the copy was
// read (the version check refuses the first attempt and it reads again),
// and a copy of an older revision is stale.
func TestApplyVerdictFrom(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, refBamboo, bambooInput("key-one"), 0)
	require.NoError(t, err)
	valid := Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, CheckedAt: b.clock.Now()}

	seen, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	ch, err := b.store.ApplyVerdictFrom(ctx, seen, valid)
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	require.Equal(t, seen.Version+1, ch.After.Version)
	require.Equal(t, []string{EventCallable}, eventTypes(ch.Events))

	// The record moves (a transient note: same revision) after the copy
	// was read: the verdict still lands on the current record.
	seen, err = b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	b.clock.Advance(time.Second)
	_, err = b.store.RecordTransient(ctx, refBamboo, seen.Revision, "status 503")
	require.NoError(t, err)
	invalid := Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401, CheckedAt: b.clock.Now()}
	ch, err = b.store.ApplyVerdictFrom(ctx, seen, invalid)
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Zero(t, ch.After.Transient.Failures, "the re-read record's transient note was cleared")
	require.Equal(t, seen.Version+2, ch.After.Version)
	counts, err := b.store.Counts(ctx)
	require.NoError(t, err)
	require.Equal(t, map[CountKey]int64{{ServiceID: "bamboohr", State: Invalid}: 1}, counts, "counts stay exact")

	// A copy of an older revision is stale.
	_, err = b.store.Patch(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": "key-two"}}, 0)
	require.NoError(t, err)
	_, err = b.store.ApplyVerdictFrom(ctx, seen, valid)
	require.ErrorIs(t, err, ErrStale)
	cur, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, Added, cur.State, "nothing applied")

	_, err = b.store.ApplyVerdictFrom(ctx, nil, valid)
	require.Error(t, err)
}
