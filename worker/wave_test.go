package worker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// fakeClock is the worker's clock in guard tests: the wave window moves
// only when the test says so.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now().Truncate(time.Second)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// waveRef names connection i of an integration in the wave tests.
func waveRef(prefix string, i int, svc string) state.Ref {
	return state.Ref{ConsumerID: fmt.Sprintf("%s-%d", prefix, i), ConnectionID: "crm+" + svc}
}

func (b *bundle) putRef(ref state.Ref) *state.Connection {
	b.t.Helper()
	ch, err := b.store.Put(context.Background(), ref, state.Input{Credentials: acmeKey()}, 0)
	require.NoError(b.t, err)
	return ch.After
}

func (b *bundle) getRef(ref state.Ref) *state.Connection {
	b.t.Helper()
	c, err := b.store.Get(context.Background(), ref)
	require.NoError(b.t, err)
	return c
}

func validateRef(t testing.TB, w *Worker, ref state.Ref) error {
	t.Helper()
	task, err := tasks.NewValidateTask(ref.ConsumerID, ref.ConnectionID, tasks.ReasonOnDemand, "")
	require.NoError(t, err)
	return process(t, w, task)
}

// degradedEvents counts the downstream.degraded events of the connections
// whose consumer id starts with prefix.
func (b *bundle) degradedEvents(prefix string) int {
	b.t.Helper()
	evs, err := b.store.ReadEvents(context.Background(), "0", 0)
	require.NoError(b.t, err)
	n := 0
	for _, e := range evs {
		if e.Type == state.EventDownstreamDegraded && len(e.ConsumerID) >= len(prefix) && e.ConsumerID[:len(prefix)] == prefix {
			n++
		}
	}
	return n
}

// TestInvalidWaveStandingPopulation: an integration with 30 connections
// that are invalid already (rechecked, the provider still says 401) and a
// guard of 2 flips per minute. The rechecks flip nothing, so they do not
// count: a new wrong key still turns invalid at once, and no invalid
// connection gets a downstream.degraded event. (Before, every invalid
// result counted: the new key was held back as `added`/`degraded`.)
func TestInvalidWaveStandingPopulation(t *testing.T) {
	b := setup(t)
	b.p.handle("/waveco/me", status(401))
	clock := newFakeClock()
	w := b.worker(func(c *Config) { c.NowFunc = clock.Now })
	ctx := context.Background()
	const standing = 30
	for i := range standing {
		c := b.putRef(waveRef("old", i, "waveco"))
		_, err := b.store.ApplyVerdictFrom(ctx, c, state.Verdict{Outcome: state.OutcomeInvalid,
			Reason: state.ReasonCredentialsRejected, HTTPStatus: 401, Revision: c.Revision})
		require.NoError(t, err)
	}
	for i := range standing {
		ref := waveRef("old", i, "waveco")
		require.NoError(t, validateRef(t, w, ref), "a recheck of an invalid connection is never held")
		c := b.getRef(ref)
		require.Equal(t, state.Invalid, c.State)
		require.Equal(t, state.HealthNeedsAuth, c.Health)
	}
	fresh := waveRef("new", 0, "waveco")
	b.putRef(fresh)
	require.NoError(t, validateRef(t, w, fresh))
	require.Equal(t, state.Invalid, b.getRef(fresh).State, "the new wrong key is invalidated")
	require.Zero(t, testutil.ToFloat64(w.metrics.held.WithLabelValues("waveco")))
	require.Equal(t, float64(standing+1), testutil.ToFloat64(w.metrics.checks.WithLabelValues("waveco", outcomeInvalid)),
		"every 401 still counts as an invalid check (the alert sees them)")
	require.Zero(t, b.degradedEvents("old-"))
}

// TestInvalidWaveHeldBack: the provider suddenly rejects every key of an
// integration whose catalog sets invalid_wave (2 flips per minute). The
// first two flips apply; the rest are held as transient failures retried
// once the oldest flip has left the window, state unchanged, counted and
// logged; an invalid connection rechecked meanwhile is not held and gets
// no downstream.degraded event. Once the window passes, the held
// invalidations go through, two per window. The clock is the worker's
// fake clock: no wall-clock minute bucket can split the wave.
func TestInvalidWaveHeldBack(t *testing.T) {
	b := setup(t)
	b.p.handle("/waveco/me", status(401))
	b.p.handle("/only401/me", status(401))
	clock := newFakeClock()
	w := b.worker(func(c *Config) { c.NowFunc = clock.Now })
	ctx := context.Background()
	const n = 5
	for _, svc := range []string{"waveco", "only401"} {
		for i := range n {
			b.putRef(waveRef("wave", i, svc))
		}
	}
	already := waveRef("invalid", 0, "waveco")
	c := b.putRef(already)
	_, err := b.store.ApplyVerdictFrom(ctx, c, state.Verdict{Outcome: state.OutcomeInvalid,
		Reason: state.ReasonCredentialsRejected, HTTPStatus: 401, Revision: c.Revision})
	require.NoError(t, err)

	start := clock.Now()
	var held []state.Ref
	for i := range n {
		ref := waveRef("wave", i, "waveco")
		err := validateRef(t, w, ref)
		c := b.getRef(ref)
		if i < 2 {
			require.NoError(t, err)
			require.Equal(t, state.Invalid, c.State, "below the threshold the verdict applies")
			continue
		}
		held = append(held, ref)
		var ra *RetryAfterError
		require.True(t, errors.As(err, &ra), "held back as a retry: %v", err)
		untilFree := start.Add(time.Minute).Sub(clock.Now())
		require.GreaterOrEqual(t, ra.After, untilFree, "retried once the oldest flip left the window")
		require.LessOrEqual(t, ra.After, untilFree+6*time.Second, "plus at most a tenth of the window of jitter")
		require.Contains(t, err.Error(), "invalid verdict held")
		require.Equal(t, state.Added, c.State, "state unchanged while held")
		require.Equal(t, state.HealthDegraded, c.Health)
		clock.Advance(time.Second)
	}
	// An invalid connection rechecked in the middle of the wave: no flip,
	// not held, no downstream trouble announced.
	require.NoError(t, validateRef(t, w, already))
	require.Equal(t, state.Invalid, b.getRef(already).State)
	require.Zero(t, b.degradedEvents("invalid-"))

	require.Equal(t, float64(len(held)), testutil.ToFloat64(w.metrics.held.WithLabelValues("waveco")))
	require.Equal(t, float64(n+1), testutil.ToFloat64(w.metrics.checks.WithLabelValues("waveco", outcomeInvalid)))
	require.Contains(t, b.logs.String(), "invalid verdict held back: wave of invalid verdicts")

	// Still inside the window: held again.
	require.Error(t, validateRef(t, w, held[0]))
	require.Equal(t, state.Added, b.getRef(held[0]).State)

	// The window passes: the genuine invalidations go through, at most
	// two per window.
	clock.Advance(start.Add(time.Minute + time.Second).Sub(clock.Now()))
	flipped := 0
	for _, ref := range held {
		if validateRef(t, w, ref) == nil {
			flipped++
			require.Equal(t, state.Invalid, b.getRef(ref).State)
		}
	}
	require.Equal(t, 2, flipped, "two flips per window")
	clock.Advance(time.Minute + time.Second)
	for _, ref := range held {
		if b.getRef(ref).State != state.Invalid {
			require.NoError(t, validateRef(t, w, ref))
		}
		require.Equal(t, state.Invalid, b.getRef(ref).State)
	}

	// An integration without the guard invalidates them all at once.
	for i := range n {
		ref := waveRef("wave", i, "only401")
		require.NoError(t, validateRef(t, w, ref))
		require.Equal(t, state.Invalid, b.getRef(ref).State, "no guard: every verdict applies")
	}
	require.Zero(t, testutil.ToFloat64(w.metrics.held.WithLabelValues("only401")))
	requireNoSecrets(t, b.logs.String())
}

// TestInvalidWaveCountsAfterConfirmation: with confirm_invalid 1 and a
// guard of one flip per minute, the first 401 of each connection is a
// confirmation step that flips nothing and is never counted; the
// confirming 401 of the first connection flips it, and only the second
// connection's confirming flip is held.
func TestInvalidWaveCountsAfterConfirmation(t *testing.T) {
	b := setup(t)
	b.p.handle("/waveconfirm/me", status(401))
	clock := newFakeClock()
	w := b.worker(func(c *Config) { c.NowFunc = clock.Now })
	a, z := waveRef("conf", 0, "waveconfirm"), waveRef("conf", 1, "waveconfirm")
	b.putRef(a)
	b.putRef(z)
	for _, ref := range []state.Ref{a, z} {
		require.NoError(t, validateRef(t, w, ref))
		c := b.getRef(ref)
		require.Equal(t, state.Added, c.State)
		require.Equal(t, state.HealthPendingConfirmation, c.Health)
	}
	require.NoError(t, validateRef(t, w, a), "the first flip of the window")
	require.Equal(t, state.Invalid, b.getRef(a).State)
	err := validateRef(t, w, z)
	var ra *RetryAfterError
	require.ErrorAs(t, err, &ra, "the second flip is over the threshold of one")
	require.Equal(t, state.Added, b.getRef(z).State)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.held.WithLabelValues("waveconfirm")))
}

// TestGuardFlipContract: guardFlip counts and holds only flips reached
// through a provider's answer.
func TestGuardFlipContract(t *testing.T) {
	b := setup(t)
	clock := newFakeClock()
	w := b.worker(func(c *Config) { c.NowFunc = clock.Now })
	ctx := context.Background()
	in := integ(t, b.cat, "waveco")
	verdict := func(c *state.Connection, status int) state.Verdict {
		return state.Verdict{Outcome: state.OutcomeInvalid, Reason: state.ReasonCredentialsRejected, HTTPStatus: status, Revision: c.Revision}
	}
	var conns []*state.Connection
	for i := range 4 {
		conns = append(conns, b.putRef(waveRef("g", i, "waveco")))
	}
	for _, c := range conns[:2] {
		held, _ := w.guardFlip(ctx, in, c, verdict(c, 401), clock.Now())
		require.False(t, held)
	}
	held, after := w.guardFlip(ctx, in, conns[2], verdict(conns[2], 401), clock.Now())
	require.True(t, held, "the window is full")
	require.GreaterOrEqual(t, after, time.Minute)
	held, _ = w.guardFlip(ctx, in, conns[0], verdict(conns[0], 401), clock.Now())
	require.False(t, held, "a flip already counted (a retry after a failed write) is not counted twice")
	held, _ = w.guardFlip(ctx, in, conns[3], verdict(conns[3], 0), clock.Now())
	require.False(t, held, "no provider answer: never held")
	held, _ = w.guardFlip(ctx, in, conns[3], state.Verdict{Outcome: state.OutcomeValid, HTTPStatus: 200, Revision: conns[3].Revision}, clock.Now())
	require.False(t, held, "a valid verdict is no flip")
	held, _ = w.guardFlip(ctx, integ(t, b.cat, "only401"), conns[3], verdict(conns[3], 401), clock.Now())
	require.False(t, held, "no guard in the catalog")
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.held.WithLabelValues("waveco")))
}

// TestInvalidWaveHoldsRefreshRevocations: refresh revocations pass the
// same guard as checks. With one flip per minute and a token endpoint
// that suddenly answers invalid_grant to everyone, the first connection
// is revoked, the second is held (state kept, retried later, counted),
// and goes through once the window has passed.
func TestInvalidWaveHoldsRefreshRevocations(t *testing.T) {
	b := setup(t)
	b.p.handle("/owave/token", func(rw http.ResponseWriter, _ *http.Request) {
		writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "invalid_grant"})
	})
	clock := newFakeClock()
	w := b.worker(func(c *Config) { c.NowFunc = clock.Now })
	ctx := context.Background()
	var refs []state.Ref
	for i := range 2 {
		ref := state.Ref{ConsumerID: fmt.Sprintf("ow-%d", i), ConnectionID: "accounting+owave"}
		_, err := b.store.Put(ctx, ref, state.Input{Credentials: map[string]string{
			"access_token": secretAccess, "refresh_token": secretRefresh,
			"expires_at": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}}, 0)
		require.NoError(t, err)
		refs = append(refs, ref)
	}
	refresh := func(ref state.Ref, key string) error {
		task, err := tasks.NewRefreshTask(ref.ConsumerID, ref.ConnectionID, tasks.ReasonExpired, key)
		require.NoError(t, err)
		return process(t, w, task)
	}
	require.NoError(t, refresh(refs[0], "1"))
	require.Equal(t, state.Invalid, b.getRef(refs[0]).State)
	require.Equal(t, state.HealthRevoked, b.getRef(refs[0]).Health)

	err := refresh(refs[1], "1")
	var ra *RetryAfterError
	require.ErrorAs(t, err, &ra, "the second revocation within the minute is held")
	require.GreaterOrEqual(t, ra.After, time.Minute)
	require.Equal(t, state.Callable, b.getRef(refs[1]).State, "state kept while held")
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.held.WithLabelValues("owave")))
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("owave", refreshHeld)))

	clock.Advance(time.Minute + time.Second)
	err = refresh(refs[1], "2")
	require.NoError(t, err)
	require.Equal(t, state.Invalid, b.getRef(refs[1]).State, "after the window the revocation goes through")
	requireNoSecrets(t, b.logs.String())
}
