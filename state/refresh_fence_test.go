package state

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

func TestRefreshLeaseIsExclusiveAndFenced(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)

	l1, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.ErrorIs(t, err, ErrRefreshLocked)
	locked, err := b.store.RefreshLocked(ctx, refSF)
	require.NoError(t, err)
	require.True(t, locked)
	lock, intent := b.store.fenceKeys(refSF)
	require.Equal(t, b.store.keysOf(refSF).tag, lock[:len(b.store.keysOf(refSF).tag)], "the lease shares the record's hash tag")
	require.Equal(t, b.store.keysOf(refSF).tag, intent[:len(b.store.keysOf(refSF).tag)])

	require.NoError(t, b.store.ExtendRefresh(ctx, l1, 2*time.Minute))
	require.Greater(t, b.rdb.PTTL(ctx, lock).Val(), time.Minute)

	// The lease lapses (Redis stalled past its TTL): another holder gets
	// it, and the first one can neither extend nor release it.
	p, err := b.store.BeginExchange(ctx, l1, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	require.Equal(t, Prior{}, p)
	require.NoError(t, b.rdb.Del(ctx, lock).Err())
	l2, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	require.ErrorIs(t, b.store.ExtendRefresh(ctx, l1, time.Minute), ErrFenced)
	require.NoError(t, b.store.ReleaseRefresh(ctx, l1))
	require.EqualValues(t, 1, b.rdb.Exists(ctx, lock).Val(), "only the holder releases")

	// l1's exchange may still be persisting: l2 must not start another.
	_, err = b.store.BeginExchange(ctx, l2, Lineage("rt"), time.Minute)
	require.ErrorIs(t, err, ErrExchangeInFlight)

	// l2 cannot revoke (the intent is l1's); l1 can still store its tokens
	// although its lease is gone, and that clears the intent.
	seen, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	_, err = b.store.RevokeRefresh(ctx, l2, seen, Verdict{Reason: ReasonRefreshTokenRevoked})
	require.ErrorIs(t, err, ErrFenced)
	ch, err := b.store.StoreRefreshedTokens(ctx, l1, "rt", Tokens{AccessToken: "at2", RefreshToken: "rt2", ExpiresAt: storeT0.Add(2 * time.Hour)})
	require.NoError(t, err)
	require.Equal(t, "rt2", ch.After.Credentials.RefreshToken)
	require.Equal(t, Callable, ch.After.State)
	require.Zero(t, b.rdb.Exists(ctx, intent).Val(), "the intent ends with the write")

	// With no intent, l2 may begin; storing for l1 again is fenced out.
	_, err = b.store.BeginExchange(ctx, l2, Lineage("rt2"), time.Minute)
	require.NoError(t, err)
	_, err = b.store.StoreRefreshedTokens(ctx, l1, "rt2", Tokens{AccessToken: "at3"})
	require.ErrorIs(t, err, ErrFenced)
}

func TestExchangeIntentUnknownOutcome(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	l1, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = b.store.BeginExchange(ctx, l1, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	// The request timed out: its outcome is unknown.
	require.NoError(t, b.store.SettleExchange(ctx, l1, false))
	require.NoError(t, b.store.ReleaseRefresh(ctx, l1))

	l2, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	p, err := b.store.BeginExchange(ctx, l2, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	require.Equal(t, Prior{Lineage: Lineage("rt"), Unknown: true}, p)

	// An intent whose holder died ages out into an unknown outcome too.
	require.NoError(t, b.store.ReleaseRefresh(ctx, l2))
	l3, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = b.store.BeginExchange(ctx, l3, Lineage("rt"), time.Minute)
	require.ErrorIs(t, err, ErrExchangeInFlight, "l2's intent is young")
	time.Sleep(10 * time.Millisecond)
	p, err = b.store.BeginExchange(ctx, l3, Lineage("rt"), 5*time.Millisecond)
	require.NoError(t, err, "l2's intent is older than the max age")
	require.True(t, p.Unknown)
}

// TestStoredTokensVoidRevocationOfSameLineage: a revocation verdict about a
// refresh token is void once tokens obtained with that same token are
// stored (the race of issue 10's defect 2 leaves no invalid connection
// with valid tokens behind).
func TestStoredTokensVoidRevocationOfSameLineage(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	l, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = b.store.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	seen, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	ch, err := b.store.RevokeRefresh(ctx, l, seen, Verdict{Reason: ReasonRefreshTokenRevoked, CheckedAt: storeT0})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthRevoked, ch.After.Health)
	require.Equal(t, Lineage("rt"), ch.After.Verdict.Lineage)

	ch, err = b.store.StoreTokens(ctx, refSF, "rt", Tokens{AccessToken: "at2", RefreshToken: "rt2", ExpiresAt: storeT0.Add(2 * time.Hour)})
	require.NoError(t, err)
	require.Nil(t, ch.After.Verdict)
	require.Equal(t, Callable, ch.After.State)
	require.Equal(t, HealthOK, ch.After.Health)
}

func TestRefreshDueScalesWithLifetime(t *testing.T) {
	t.Parallel()
	in := oauthHubSpot // no refresh_window: min(10m, 20% of the lifetime)
	tests := map[string]struct {
		lifetime, age time.Duration
		due, expired  bool
	}{
		"OneMinuteJustIssued":   {time.Minute, 0, false, false},
		"OneMinuteAt40s":        {time.Minute, 40 * time.Second, false, false},
		"OneMinuteAt50s":        {time.Minute, 50 * time.Second, true, false},
		"OneMinuteAt55s":        {time.Minute, 55 * time.Second, true, true},
		"ThreeMinutesJustIssue": {3 * time.Minute, time.Second, false, false},
		"OneHourAt49m":          {time.Hour, 49 * time.Minute, false, false},
		"OneHourAt51m":          {time.Hour, 51 * time.Minute, true, false},
		"OneHourAt59m30s":       {time.Hour, 59*time.Minute + 30*time.Second, true, true},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c := Credentials{AccessToken: "a", RefreshToken: "r", IssuedAt: storeT0, ExpiresAt: storeT0.Add(tc.lifetime)}
			now := storeT0.Add(tc.age)
			require.Equal(t, tc.due, RefreshDue(c, in, now), "due")
			require.Equal(t, tc.expired, TokenExpired(c, now), "expired")
		})
	}
}

// TestCheckVerdictCannotReplaceDeadRefreshToken: once the token endpoint
// said the revision's refresh token is dead, a check verdict (which saw
// only the last access token) changes nothing; a new revision does.
func TestCheckVerdictCannotReplaceDeadRefreshToken(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	_, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	l, err := b.store.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = b.store.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	seen, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	ch, err := b.store.RevokeRefresh(ctx, l, seen, Verdict{Reason: ReasonRotationLost})
	require.NoError(t, err)
	require.Equal(t, HealthRotationLost, ch.After.Health)

	for _, v := range []Verdict{{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401}, {Outcome: OutcomeValid, Reason: ReasonCheckPassed}} {
		ch, err = b.store.ApplyVerdictFrom(ctx, seen, v)
		require.NoError(t, err)
		require.Equal(t, ReasonRotationLost, ch.After.Verdict.Reason, "a check does not replace %s", v.Reason)
		require.Equal(t, HealthRotationLost, ch.After.Health)
	}
	// The consumer re-authorizes: a new revision, judged afresh.
	ch, err = b.store.Put(ctx, refSF, sfInput("at2", "rt2", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	ch, err = b.store.ApplyVerdictFrom(ctx, ch.After, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	require.Equal(t, HealthOK, ch.After.Health)
}

// TestRefreshedTokensWaitForReplicas: with AckReplicas, tokens count as
// stored only once a replica has them (a failover drops what the old
// master acknowledged alone, and with it a rotated refresh token). Without
// a replica the attempt is reported ErrNotReplicated (already at its
// exchange intent, TestExchangeIntentWaitsForReplicas) and retried until a
// replica acknowledges.
func TestRefreshedTokensWaitForReplicas(t *testing.T) {
	t.Parallel()
	master, st, _ := ackedStore(t, 500*time.Millisecond)
	ctx := context.Background()
	store := func() error {
		l, err := st.AcquireRefresh(ctx, refSF, time.Minute)
		require.NoError(t, err)
		defer func() { _ = st.ReleaseRefresh(ctx, l) }()
		if _, err := st.BeginExchange(ctx, l, Lineage("rt"), time.Minute); err != nil && !errors.Is(err, ErrExchangeInFlight) {
			return err
		}
		_, err = st.StoreRefreshedTokens(ctx, l, "rt", Tokens{AccessToken: "at2", RefreshToken: "rt2", ExpiresAt: time.Now().Add(time.Hour)})
		return err
	}
	err := store()
	require.ErrorIs(t, err, ErrNotReplicated, "no replica: not acknowledged")
	require.True(t, Unavailable(err), "retried like Redis being away")

	// A replica joins and catches up: the retry is acknowledged.
	attachReplica(t, master)
	// The worker retries an unacknowledged write; so does the test, until
	// the replica has acknowledged what the first attempt stored.
	require.Eventually(t, func() bool { return store() == nil }, 20*time.Second, 100*time.Millisecond,
		"stored by the first attempt, then acknowledged")
	c, err := st.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, "rt2", c.Credentials.RefreshToken)
}

// TestExchangeIntentWaitsForReplicas: with AckReplicas, the exchange
// intent must be on a replica before the provider is called; otherwise a
// failover forgets it and another worker exchanges the same refresh token
// (the provider answers invalid_grant to one of them). Without a replica
// BeginExchange refuses with ErrNotReplicated and leaves no intent.
func TestExchangeIntentWaitsForReplicas(t *testing.T) {
	t.Parallel()
	master, st, keys := ackedStore(t, 300*time.Millisecond)
	ctx := context.Background()

	l, err := st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = st.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.ErrorIs(t, err, ErrNotReplicated, "no replica: the exchange must not start")
	require.True(t, Unavailable(err), "retried like Redis being away")
	owner, _, _, _, err := st.Intent(ctx, refSF)
	require.NoError(t, err)
	require.Empty(t, owner, "no intent left behind: nothing was sent")

	rc := attachReplica(t, master)
	require.Eventually(t, func() bool {
		_, err := st.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
		return err == nil
	}, 20*time.Second, 100*time.Millisecond, "with a replica the intent is acknowledged")
	// The replica holds the intent the provider call is fenced by.
	onReplica, err := New(Config{Client: rc, Catalog: storeCatalog(t), Keys: keys})
	require.NoError(t, err)
	owner, lineage, _, _, err := onReplica.Intent(ctx, refSF)
	require.NoError(t, err)
	require.NotEmpty(t, owner)
	require.Equal(t, Lineage("rt"), lineage)
}

// ackedStore is a store on a master of its own that asks one replica to
// acknowledge fenced writes within timeout, holding refSF; the master has
// no replica yet.
func ackedStore(t *testing.T, timeout time.Duration) (*redistest.Server, *Store, *secrets.Keyring) {
	t.Helper()
	master := redistest.New(t)
	if !master.Real {
		t.Skip("needs redis-server: miniredis has no replication")
	}
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := New(Config{Client: master.Client(t), Catalog: storeCatalog(t), Keys: keys, AckReplicas: 1, AckTimeout: timeout})
	require.NoError(t, err)
	_, err = st.Put(context.Background(), refSF, sfInput("at", "rt", time.Now().Add(time.Hour)), 0)
	require.NoError(t, err)
	return master, st, keys
}

// attachReplica starts a replica of master and waits until its link is up.
func attachReplica(t *testing.T, master *redistest.Server) *redis.Client {
	t.Helper()
	ctx := context.Background()
	replica := redistest.New(t)
	host, port, _ := strings.Cut(master.Addr, ":")
	rc := redis.NewClient(&redis.Options{Addr: replica.Addr})
	t.Cleanup(func() { _ = rc.Close() })
	require.NoError(t, rc.Do(ctx, "replicaof", host, port).Err())
	require.Eventually(t, func() bool {
		info, err := rc.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "master_link_status:up")
	}, 20*time.Second, 50*time.Millisecond)
	return rc
}

// TestExchangeIntentWithLostReplyIsAbandoned: BeginExchange is sent while
// Redis stalls (SIGSTOP) and its client gives up before the reply; the
// script still runs when Redis wakes. The abandon BeginExchange sends
// (fence_abandon.lua) leaves no intent of ours in flight and no lease,
// whichever of the two Redis runs first, so the next holder takes the
// lease and begins its exchange at once instead of waiting for the intent
// to age out.
func TestExchangeIntentWithLostReplyIsAbandoned(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	if !srv.Real {
		t.Skip("needs redis-server (a process to stop)")
	}
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	impatient := redis.NewClient(&redis.Options{Addr: srv.Addr, ReadTimeout: 300 * time.Millisecond, MaxRetries: -1})
	t.Cleanup(func() { _ = impatient.Close() })
	st, err := New(Config{Client: impatient, Catalog: storeCatalog(t), Keys: keys})
	require.NoError(t, err)
	ctx := context.Background()
	_, err = st.Put(ctx, refSF, sfInput("at", "rt", time.Now().Add(time.Hour)), 0)
	require.NoError(t, err)
	// A running fleet has the fence's scripts loaded: the stalled
	// BeginExchange is an EVALSHA that runs when Redis wakes.
	l0, err := st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = st.BeginExchange(ctx, l0, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	require.NoError(t, st.SettleExchange(ctx, l0, true))
	require.NoError(t, st.ReleaseRefresh(ctx, l0))
	l, err := st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)

	srv.Pause(t) // SIGSTOP: commands wait in the socket until it resumes
	time.AfterFunc(time.Second, srv.Resume)
	_, err = st.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.Error(t, err, "no reply within the client's timeout")
	require.False(t, ReplyError(err))

	pc := redis.NewClient(&redis.Options{Addr: srv.Addr}) // the same database as impatient's
	t.Cleanup(func() { _ = pc.Close() })
	patient, err := New(Config{Client: pc, Catalog: storeCatalog(t), Keys: keys})
	require.NoError(t, err)
	// The lease is free once Redis has run the abandon (the stalled
	// commands run in any order after it resumes); without it the lease
	// is held for its whole minute.
	var l2 *RefreshLease
	require.Eventually(t, func() bool {
		var aerr error
		l2, aerr = patient.AcquireRefresh(ctx, refSF, time.Minute)
		return aerr == nil
	}, 5*time.Second, 20*time.Millisecond, "the abandoned lease is free")
	_, err = patient.BeginExchange(ctx, l2, Lineage("rt"), time.Minute)
	require.NoError(t, err, "no intent of ours in flight: the next holder begins at once")
}
