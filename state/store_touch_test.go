package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

// TestUnchangedVerdictTakesTheLeanWrite: a check that changes nothing but
// its time (the bulk of a fleet's checks) is written by touch.lua, not by
// write.lua: the record's version and data move, the check is due one
// interval later, and no index, count or event is touched. A change of
// state still takes write.lua.
func TestUnchangedVerdictTakesTheLeanWrite(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k1"), 0)
	require.NoError(t, err)
	rev := ch.After.Revision
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	require.NotEmpty(t, ch.Events, "added -> callable is an event")

	watch := redistest.WatchScripts(t, b.rdb.Options().Addr)
	b.clock.Advance(time.Hour)
	before := dumpDB(t, b.rdb)
	seen, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	ch, err = b.store.ApplyVerdictFrom(ctx, seen, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Empty(t, ch.Events)
	require.Equal(t, seen.Version+1, ch.After.Version)
	require.Equal(t, b.clock.Now(), ch.After.Verdict.CheckedAt)

	got, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, ch.After.Version, got.Version)
	require.Equal(t, b.clock.Now(), got.Verdict.CheckedAt, "the check's time is stored")
	due, ok, err := b.store.DueAt(ctx, IndexCheck, refBamboo)
	require.NoError(t, err)
	require.True(t, ok)
	in := mustIntegration(t, b.store, refBamboo)
	require.Equal(t, NextCheckAt(refBamboo, in, Callable, b.clock.Now(), DefaultJitter).UnixMilli(), due.UnixMilli(),
		"the next check is one interval after this one")

	after := dumpDB(t, b.rdb)
	for key, v := range before {
		if key == b.store.keysOf(refBamboo).record(refBamboo.String()) || key == b.store.keysOf(refBamboo).due(IndexCheck) {
			continue
		}
		require.ElementsMatch(t, v, after[key], "%s is untouched", key)
	}

	rep := watch.Report(t)
	require.Empty(t, rep.Violations)
	require.Equal(t, 1, rep.Runs[redistest.SHA1(touchLua)], "the unchanged verdict took touch.lua")
	require.Zero(t, rep.Runs[redistest.SHA1(writeLua)], "and not write.lua")

	// A write between the read and the verdict: touch.lua refuses the
	// stale version and the store reads again (the verdict still lands,
	// for the same revision).
	seen, err = b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	_, err = b.store.Patch(ctx, refBamboo, Input{Metadata: []byte(`{"a":1}`)}, 0)
	require.NoError(t, err)
	b.clock.Advance(time.Minute)
	ch, err = b.store.ApplyVerdictFrom(ctx, seen, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Equal(t, seen.Version+2, ch.After.Version, "applied on top of the metadata write")
	require.JSONEq(t, `{"a":1}`, string(ch.After.Metadata))

	// An invalid verdict changes the state: write.lua, with its event.
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeInvalid, Reason: "unauthorized", HTTPStatus: 401})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.NotEmpty(t, ch.Events)
	n, _, err := b.store.List(ctx, Filter{State: Invalid}, "", 10)
	require.NoError(t, err)
	require.Len(t, n, 1)
}
