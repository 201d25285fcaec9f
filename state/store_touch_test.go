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
	b := setupStore(t, ownServer(t))
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
	require.Positive(t, rep.Runs[redistest.SHA1(touchLua)], "the unchanged verdict took touch.lua (EVALSHA, and EVAL on a fresh server)")
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

// TestApplyVerdictsFromPipelinesTheLeanWrites: a batch of verdicts, each
// with its own compare-and-set. The unchanged ones go in one pipeline of
// touch.lua (after the first call loaded it: a NOSCRIPT answer falls back
// to the write on its own); one whose record moved since it was read is
// applied on top of that write; an invalid one takes write.lua with its
// event. Every verdict lands once.
func TestApplyVerdictsFromPipelinesTheLeanWrites(t *testing.T) {
	t.Parallel()
	b := setupStore(t, ownServer(t))
	ctx := context.Background()
	const n = 6
	refs := make([]Ref, n)
	for i := range refs {
		refs[i] = Ref{ConsumerID: "bc" + string(rune('a'+i)), ConnectionID: refBamboo.ConnectionID}
		ch, err := b.store.Put(ctx, refs[i], bambooInput("k"), 0)
		require.NoError(t, err)
		_, err = b.store.ApplyVerdict(ctx, refs[i], ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
		require.NoError(t, err)
	}
	valid := Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200}
	apply := func(round int) ([]*Connection, []Change, []error) {
		seen := make([]*Connection, n)
		vs := make([]Verdict, n)
		for i, ref := range refs {
			c, err := b.store.Get(ctx, ref)
			require.NoError(t, err)
			seen[i], vs[i] = c, valid
		}
		vs[5] = Verdict{Outcome: OutcomeInvalid, Reason: "unauthorized", HTTPStatus: 401}
		// Member 2's record moves between the read and the write.
		_, err := b.store.Patch(ctx, refs[2], Input{Metadata: []byte(`{"x":` + string(rune('1'+round)) + `}`)}, 0)
		require.NoError(t, err)
		b.clock.Advance(time.Hour)
		chs, errs := b.store.ApplyVerdictsFrom(ctx, seen, vs)
		return seen, chs, errs
	}
	for round := range 2 {
		watch := redistest.WatchScripts(t, b.rdb.Options().Addr)
		seen, chs, errs := apply(round)
		for i := range n {
			require.NoError(t, errs[i], "round %d member %d", round, i)
			got, err := b.store.Get(ctx, refs[i])
			require.NoError(t, err)
			require.Equal(t, chs[i].After.Version, got.Version)
			require.Equal(t, b.clock.Now(), got.Verdict.CheckedAt, "round %d member %d", round, i)
		}
		require.Equal(t, seen[2].Version+2, chs[2].After.Version, "applied on top of the metadata write")
		require.JSONEq(t, `{"x":`+string(rune('1'+round))+`}`, string(chs[2].After.Metadata))
		require.Equal(t, Invalid, chs[5].After.State)
		require.NotEmpty(t, chs[5].Events)
		rep := watch.Report(t)
		require.Empty(t, rep.Violations)
		require.GreaterOrEqual(t, rep.Runs[redistest.SHA1(touchLua)], 5, "round %d: the unchanged verdicts (and the moved one's retry) took touch.lua", round)
		// Back to callable for the next round.
		for _, i := range []int{5} {
			c, err := b.store.Get(ctx, refs[i])
			require.NoError(t, err)
			_, err = b.store.ApplyVerdictFrom(ctx, c, valid)
			require.NoError(t, err)
		}
	}
}

// ownServer puts the store on a server of its own: MONITOR sees every
// database of a server, and the package's shared one serves other tests.
func ownServer(t *testing.T) func(*Config) {
	rdb := redistest.New(t).Client(t)
	return func(c *Config) { c.Client = rdb }
}
