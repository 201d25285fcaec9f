package worker

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// outageStore wraps the real store and fails the writes of refreshed
// tokens until a deadline, as a Redis failover would.
type outageStore struct {
	*state.Store
	until    atomic.Pointer[time.Time]
	refused  atomic.Int32
	accepted atomic.Int32
}

func (s *outageStore) StoreRefreshedTokens(ctx context.Context, l *state.RefreshLease, used string, t state.Tokens) (state.Change, error) {
	if u := s.until.Load(); u != nil && time.Now().Before(*u) {
		s.refused.Add(1)
		return state.Change{}, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	}
	s.accepted.Add(1)
	return s.Store.StoreRefreshedTokens(ctx, l, used, t)
}

// TestRefreshTokensSurviveRedisOutage (defect 1a): the provider rotated the
// refresh token; Redis refuses writes for 4 s (longer than the 1.5 s the
// fleet used to retry). The tokens are stored once Redis is back: no
// rotation lost, no revocation at the next refresh.
func TestRefreshTokensSurviveRedisOutage(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	b.putOAuth(90 * time.Second)
	st := &outageStore{Store: b.store}
	until := time.Now().Add(4 * time.Second)
	st.until.Store(&until)
	w := b.worker(func(c *Config) { c.Store = st })

	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "1")))
	require.Positive(t, st.refused.Load(), "the outage was hit")
	require.EqualValues(t, 1, st.accepted.Load())
	at, rt := o.current()
	c := b.get(ocoID)
	require.Equal(t, rt, c.Credentials.RefreshToken, "the rotated refresh token was kept")
	require.Equal(t, at, c.Credentials.AccessToken)
	require.Equal(t, state.Callable, c.State)
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.tokenWrites.WithLabelValues("stored")))
}

// TestShutdownWaitsForExchange (defect 1b): SIGTERM while an exchange is in
// flight and slower than the shutdown timeout plus the old fixed 5 s: Run
// returns only after the rotated tokens are stored, so the caller may
// close Redis.
func TestShutdownWaitsForExchange(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.delay = 7 * time.Second
	b.putOAuth(90 * time.Second)
	w := b.worker(func(c *Config) { c.ShutdownTimeout = time.Second; c.TokenTimeout = 15 * time.Second })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	b.enqueue(refreshTask(t, ocoID, tasks.ReasonExpired, "1"))
	eventually(t, 10*time.Second, func() bool { return o.calls.Load() == 1 }, "exchange started")
	cancel()
	require.NoError(t, <-done)
	_, rt := o.current()
	require.Equal(t, rt, b.get(ocoID).Credentials.RefreshToken, "tokens stored before Run returned")

	// No exchange starts once shutdown began.
	require.False(t, w.startExchange())
}

// TestLeaseLapseNoSecondExchange (defect 2): the first worker's lease
// lapses mid-exchange (a slow Redis); a second worker takes the lease but
// must not exchange the same refresh token while the first one's intent
// stands. The first stores its tokens; nothing is revoked.
func TestLeaseLapseNoSecondExchange(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.delay = 2 * time.Second
	b.putOAuth(90 * time.Second)
	w1, w2 := b.worker(), b.worker()
	first := make(chan error, 1)
	go func() { first <- process(t, w1, refreshTask(t, ocoID, tasks.ReasonScheduled, "1")) }()
	eventually(t, 5*time.Second, func() bool { return o.calls.Load() == 1 }, "first exchange started")
	// The lease lapses (as it does when Redis stalls past its TTL).
	n, err := b.rdb.Del(context.Background(), leaseKeyOf(t, b)).Result()
	require.NoError(t, err)
	require.EqualValues(t, 1, n)

	err = process(t, w2, refreshTask(t, ocoID, tasks.ReasonOnDemand, ""))
	require.ErrorIs(t, err, ErrRefreshBusy, "the second worker waits for the first one's outcome")
	require.NoError(t, <-first)
	require.EqualValues(t, 1, o.calls.Load(), "one exchange of that refresh token")
	c := b.get(ocoID)
	_, rt := o.current()
	require.Equal(t, rt, c.Credentials.RefreshToken)
	require.Equal(t, state.Callable, c.State)
	require.Equal(t, state.HealthOK, c.Health)
}

func leaseKeyOf(t *testing.T, b *bundle) string {
	t.Helper()
	keys, err := b.rdb.Keys(context.Background(), "*rlock:*").Result()
	require.NoError(t, err)
	require.Len(t, keys, 1)
	return keys[0]
}

// TestRotationLost: the provider rotates the refresh token but its answer
// never arrives (the exchange times out). The next refresh sends the old
// token and gets invalid_grant: the fleet lost the rotation, the user did
// not revoke anything, and the connection says so.
func TestRotationLost(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	b.putOAuth(90 * time.Second)
	var lose atomic.Bool
	lose.Store(true)
	o.override = func(rw http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		o.mu.Lock()
		if r.PostForm.Get("refresh_token") != o.rt {
			o.mu.Unlock()
			writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "invalid_grant"})
			return
		}
		o.gen++
		o.rt, o.at = "rt_SECRET_rotated", "at_SECRET_rotated"
		o.mu.Unlock()
		if lose.Load() {
			time.Sleep(2 * time.Second) // past the token timeout: the answer is lost
		}
		writeJSON(rw, http.StatusOK, map[string]any{"access_token": "at_SECRET_rotated", "refresh_token": "rt_SECRET_rotated", "expires_in": 3600})
	}
	w := b.worker(func(c *Config) { c.TokenTimeout = time.Second })
	require.Error(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "1")))
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State, "a timeout is no verdict")
	owner, lineage, status, _, err := b.store.Intent(context.Background(), c.Ref())
	require.NoError(t, err)
	require.Empty(t, owner)
	require.Equal(t, state.Lineage(secretRefresh), lineage)
	require.Equal(t, "u", status, "the exchange's outcome is unknown")

	lose.Store(false)
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "2")))
	c = b.get(ocoID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.HealthRotationLost, c.Health)
	require.Equal(t, state.ReasonRotationLost, c.Verdict.Reason)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.rotationsLost.WithLabelValues("oco")))
	require.Zero(t, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshRevoked)))
	require.Contains(t, b.logs.String(), "token rotation lost")

	// Its access token has not expired yet, but the provider rejects it
	// (rotated away): a check must not replace rotation_lost with a vaguer
	// verdict, nor send a refresh back to the dead token.
	calls := o.calls.Load()
	for range 3 {
		require.NoError(t, process(t, w, validateTask(t, ocoID)))
	}
	c = b.get(ocoID)
	require.Equal(t, state.HealthRotationLost, c.Health)
	require.Equal(t, state.ReasonRotationLost, c.Verdict.Reason)
	require.Equal(t, calls, o.calls.Load(), "no exchange of a dead refresh token")
	requireNoSecrets(t, b.logs.String())
}

// TestClientRejectedFlipsNothing (defect 4): the token endpoint rejects the
// fleet's own client. No connection is flipped; the incident is counted
// and logged with the environment variable to fix; further refreshes of
// the integration pause without calling the provider.
func TestClientRejectedFlipsNothing(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	b.putOAuth(90 * time.Second)
	o.override = func(rw http.ResponseWriter, r *http.Request) {
		writeJSON(rw, http.StatusUnauthorized, map[string]any{"error": "invalid_client", "error_description": "bad client secret"})
	}
	w := b.worker()
	err := process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "1"))
	require.ErrorIs(t, err, errClientRejected)
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State)
	require.NotEqual(t, state.HealthRevoked, c.Health)
	require.Nil(t, c.Verdict)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.clientErrors.WithLabelValues("oco")))
	logs := b.logs.String()
	require.Contains(t, logs, "rejects the fleet's oauth client credentials")
	require.Contains(t, logs, `"client_secret_env":"OCO_CLIENT_SECRET"`)

	// Paused: the next refresh does not reach the provider.
	err = process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "2"))
	require.ErrorIs(t, err, ErrCircuitOpen)
	require.EqualValues(t, 1, o.calls.Load())
	require.False(t, isFailure(err), "a paused refresh uses up no retry")
	requireNoSecrets(t, logs)
}

// TestShortLivedTokensNotRefreshedOnEveryCheck (defect 8): a 1-minute token
// just issued is not due; a check uses it without refreshing first, and
// health is ok.
func TestShortLivedTokensNotRefreshedOnEveryCheck(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.expiresIn = 60
	b.putOAuth(90 * time.Second)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "1")))
	require.EqualValues(t, 1, o.calls.Load())
	c := b.get(ocoID)
	require.Equal(t, state.HealthOK, c.Health, "a fresh 1-minute token is not pending refresh")
	for range 3 {
		require.NoError(t, process(t, w, validateTask(t, ocoID)))
	}
	require.EqualValues(t, 1, o.calls.Load(), "checks of a fresh token refresh nothing")
	require.Equal(t, state.Callable, b.get(ocoID).State)
	in, ok := b.cat.Get("oco")
	require.True(t, ok)
	require.True(t, state.RefreshDue(c.Credentials, in, c.Credentials.ExpiresAt.Add(-10*time.Second)),
		"due within its window (20% of 60 s)")
}

func TestRetryDelayAfterStoreOutage(t *testing.T) {
	b := setup(t)
	w := b.worker(func(c *Config) { c.RetryBaseDelay, c.RetryMaxDelay = 2*time.Second, 10*time.Minute })
	err := errors.Join(errStoreUnavailable, errors.New("dial tcp: connection refused"))
	for n := range 20 {
		d := w.RetryDelay(n, err, nil)
		require.LessOrEqual(t, d, storeRetryCeiling, "attempt %d", n)
		require.GreaterOrEqual(t, d, time.Second)
	}
	require.False(t, isFailure(err), "Redis being away uses up no retry")
	require.True(t, strings.Contains(err.Error(), "store unavailable"))
}

// TestCheck401AfterUnknownExchange: an exchange of the refresh token ended
// without an answer (the worker died, or it timed out) and the provider
// had rotated both tokens, so a check with the stored access token gets
// 401 though it has an hour left. The fleet asks the token endpoint
// before it judges: the verdict is rotation_lost, not credentials_rejected.
func TestCheck401AfterUnknownExchange(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	c := b.putOAuth(time.Hour)
	ctx := context.Background()
	// A worker began exchanging the stored refresh token and vanished.
	l, err := b.store.AcquireRefresh(ctx, c.Ref(), time.Minute)
	require.NoError(t, err)
	_, err = b.store.BeginExchange(ctx, l, state.Lineage(secretRefresh), time.Minute)
	require.NoError(t, err)
	require.NoError(t, b.store.SettleExchange(ctx, l, false))
	require.NoError(t, b.store.ReleaseRefresh(ctx, l))
	// The provider had rotated: both stored tokens are dead.
	o.mu.Lock()
	o.rt, o.at = "rt_SECRET_lost", "at_SECRET_lost"
	o.mu.Unlock()

	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, ocoID)))
	c = b.get(ocoID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.ReasonRotationLost, c.Verdict.Reason)
	require.Equal(t, state.HealthRotationLost, c.Health)
	require.EqualValues(t, 1, o.calls.Load(), "the token endpoint decided")
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.rotationsLost.WithLabelValues("oco")))
}
