package worker

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

const ocoID = "accounting+oco"

// oauthAPI behaves like a provider that rotates refresh tokens: every
// refresh returns a new refresh token and kills the old one (a reused one
// gets invalid_grant), and the check accepts only the latest access token.
type oauthAPI struct {
	mu        sync.Mutex
	rt, at    string
	gen       int
	calls     atomic.Int32
	delay     time.Duration
	expiresIn int
	// override, if set, answers the token request instead.
	override http.HandlerFunc
}

func newOAuthAPI(b *bundle) *oauthAPI {
	o := &oauthAPI{rt: secretRefresh, expiresIn: 3600}
	b.p.handle("/oco/token", o.token)
	b.p.handle("/oco/me", o.check)
	return o
}

func (o *oauthAPI) token(rw http.ResponseWriter, r *http.Request) {
	o.calls.Add(1)
	o.mu.Lock()
	override := o.override
	o.mu.Unlock()
	if override != nil {
		override(rw, r)
		return
	}
	id, secret, ok := r.BasicAuth()
	if !ok || id != clientID || secret != clientSecret {
		writeJSON(rw, http.StatusUnauthorized, map[string]any{"error": "invalid_client"})
		return
	}
	if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "refresh_token" {
		writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "invalid_request"})
		return
	}
	time.Sleep(o.delay)
	o.mu.Lock()
	defer o.mu.Unlock()
	if r.PostForm.Get("refresh_token") != o.rt {
		writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "invalid_grant", "error_description": "refresh token reused or revoked"})
		return
	}
	o.gen++
	o.rt = fmt.Sprintf("rt_SECRET_refresh_%d", o.gen)
	o.at = fmt.Sprintf("at_SECRET_access_%d", o.gen)
	body := map[string]any{"access_token": o.at, "refresh_token": o.rt, "token_type": "Bearer"}
	if o.expiresIn > 0 {
		body["expires_in"] = o.expiresIn
	}
	writeJSON(rw, http.StatusOK, body)
}

func (o *oauthAPI) check(rw http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	at := o.at
	o.mu.Unlock()
	if at == "" || r.Header.Get("Authorization") != "Bearer "+at {
		writeJSON(rw, http.StatusUnauthorized, map[string]any{"error": "invalid_token"})
		return
	}
	writeJSON(rw, http.StatusOK, map[string]any{"id": "org-1"})
}

func (o *oauthAPI) current() (at, rt string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.at, o.rt
}

func writeJSON(rw http.ResponseWriter, code int, v any) {
	rw.Header().Set("Content-Type", "application/json")
	rw.WriteHeader(code)
	_ = json.NewEncoder(rw).Encode(v)
}

// putOAuth stores the oco connection with a one-hour token issued long
// enough ago that it expires in expiresIn.
func (b *bundle) putOAuth(expiresIn time.Duration) *state.Connection {
	c := b.put(ocoID, map[string]string{
		"access_token":  secretAccess,
		"refresh_token": secretRefresh,
		"expires_at":    time.Now().Add(expiresIn).UTC().Format(time.RFC3339),
	}, nil)
	exp := c.Credentials.ExpiresAt
	ch, err := b.store.StoreTokens(context.Background(), c.Ref(), secretRefresh,
		state.Tokens{AccessToken: secretAccess, ExpiresAt: exp, IssuedAt: exp.Add(-time.Hour)})
	if err != nil {
		panic(err)
	}
	return ch.After
}

func TestRefreshRotates(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	// A one-hour token with 90s left: inside its 10-minute window.
	before := b.putOAuth(90 * time.Second)
	require.Equal(t, state.Callable, before.State)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonScheduled, "1")))
	at, rt := o.current()
	c := b.get(ocoID)
	require.Equal(t, at, c.Credentials.AccessToken)
	require.Equal(t, rt, c.Credentials.RefreshToken)
	require.WithinDuration(t, time.Now().Add(time.Hour), c.Credentials.ExpiresAt, 5*time.Second)
	require.Equal(t, before.Revision, c.Revision, "a refresh is no new credentials revision")
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshRefreshed)))

	// The token is fresh now: another trigger is a no-op.
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonOnDemand, "")))
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshSkipped)))
	requireNoSecrets(t, b.logs.String())
}

func TestRefreshWithoutExpiresInOrRotation(t *testing.T) {
	b := setup(t)
	b.p.handle("/oco/token", func(rw http.ResponseWriter, r *http.Request) {
		// Salesforce: no expires_in, and no new refresh token.
		writeJSON(rw, http.StatusOK, map[string]any{"access_token": "at_SECRET_sf", "token_type": "Bearer",
			"instance_url": "https://acme.my.salesforce.com"})
	})
	b.putOAuth(-time.Minute)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1")))
	c := b.get(ocoID)
	require.Equal(t, "at_SECRET_sf", c.Credentials.AccessToken)
	require.Equal(t, secretRefresh, c.Credentials.RefreshToken, "no refresh_token in the answer keeps the stored one")
	require.WithinDuration(t, time.Now().Add(time.Hour), c.Credentials.ExpiresAt, 5*time.Second,
		"the catalog's token_lifetime (1h) stands in for expires_in")
}

func TestRefreshInvalidGrantRevokes(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.rt = "some-other-token" // the stored one is dead at the provider
	b.putOAuth(30 * time.Second)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1")))
	c := b.get(ocoID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.HealthRevoked, c.Health)
	require.Equal(t, state.ReasonRefreshTokenRevoked, c.Verdict.Reason)
	require.Equal(t, 400, c.Verdict.HTTPStatus)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshRevoked)))

	// A dead refresh token is not tried again until the consumer
	// re-authorizes.
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "2")))
	require.NoError(t, process(t, w, validateTask(t, ocoID)))
	require.EqualValues(t, 1, o.calls.Load())
	require.Zero(t, b.p.count("/oco/me"), "an expired token with a dead refresh token is not checked")
	require.Equal(t, state.HealthRevoked, b.get(ocoID).Health)
}

func TestRefreshInvalidGrantAfterReauthorizeIsNoVerdict(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	b.putOAuth(30 * time.Second)
	o.override = func(rw http.ResponseWriter, r *http.Request) {
		// The consumer re-authorizes while our refresh is on its way; the
		// provider rejects the old refresh token.
		b.put(ocoID, map[string]string{"access_token": "at_SECRET_new", "refresh_token": "rt_SECRET_new",
			"expires_at": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}, nil)
		writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "invalid_grant"})
	}
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1")))
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State)
	require.Nil(t, c.Verdict)
	require.Equal(t, "rt_SECRET_new", c.Credentials.RefreshToken)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshLostRace)))
}

func TestRefreshTransient(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.override = func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Retry-After", "12")
		writeJSON(rw, http.StatusServiceUnavailable, map[string]any{"error": "temporarily_unavailable"})
	}
	b.putOAuth(30 * time.Second)
	w := b.worker()
	err := process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1"))
	require.ErrorContains(t, err, "token endpoint answered 503")
	require.Equal(t, 12*time.Second, w.RetryDelay(0, err, nil))
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State, "transient refresh failures never change the state")
	require.Equal(t, state.HealthPendingRefresh, c.Health)
	require.Equal(t, 1, c.Refresh.Failures)
	require.Equal(t, secretRefresh, c.Credentials.RefreshToken)

	t.Run("MissingClientCredentials", func(t *testing.T) {
		w := b.worker(func(c *Config) { c.Getenv = func(string) string { return "" } })
		calls := o.calls.Load()
		err := process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1"))
		require.ErrorContains(t, err, "OCO_CLIENT_ID")
		require.Equal(t, calls, o.calls.Load(), "no token request without client credentials")
		require.Equal(t, state.Callable, b.get(ocoID).State)
	})
	requireNoSecrets(t, b.logs.String())
}

func TestRefreshNoOps(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	enabled := false
	_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: ocoID}, state.Input{
		Enabled:     &enabled,
		Credentials: map[string]string{"access_token": secretAccess, "refresh_token": secretRefresh, "expires_at": time.Now().UTC().Format(time.RFC3339)},
	}, 0)
	require.NoError(t, err)
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ocoID, tasks.ReasonExpired, "1")), "disabled")
	require.NoError(t, process(t, w, refreshTask(t, "crm+acme", tasks.ReasonExpired, "1")), "not oauth")
	require.NoError(t, process(t, w, refreshTask(t, "crm+qkey", tasks.ReasonExpired, "1")), "not found")
	require.NoError(t, process(t, w, validateTask(t, ocoID)), "disabled")
	require.Zero(t, o.calls.Load())
	require.Zero(t, b.p.total())
}

// TestRefreshExactlyOnce: 50 triggers for one connection at once, from
// scheduled refresh tasks, on-demand refresh tasks and validations that
// get a 401 near expiry, on two workers, against a provider that rotates
// refresh tokens and rejects a reused one.
func TestRefreshExactlyOnce(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.delay = 150 * time.Millisecond // widen the window for a second refresh
	// The stored token expires in 90s: close enough to refresh, not yet
	// expired, and the provider already refuses it (401 on the check).
	b.putOAuth(90 * time.Second)

	// Refresh tasks of one connection share one task id (one chain in the
	// queue), so the refresh triggers here are handed to both workers'
	// handlers directly, as duplicate deliveries and in-process triggers
	// would be; the validations go through the queue.
	var refreshes []*asynq.Task
	for i := range 20 {
		refreshes = append(refreshes, refreshTask(t, ocoID, tasks.ReasonScheduled, fmt.Sprint(1000+i)))
	}
	for range 15 {
		refreshes = append(refreshes, refreshTask(t, ocoID, tasks.ReasonOnDemand, ""))
	}
	var wg sync.WaitGroup
	for range 15 {
		task := validateTask(t, ocoID)
		wg.Go(func() { b.enqueue(task) })
	}
	wg.Wait()

	w1, w2 := b.worker(func(c *Config) { c.Concurrency = 30 }), b.worker(func(c *Config) { c.Concurrency = 30 })
	b.start(w1)
	b.start(w2)
	errs := make(chan error, len(refreshes))
	for i, task := range refreshes {
		w := w1
		if i%2 == 1 {
			w = w2
		}
		wg.Go(func() { errs <- w.Handler().ProcessTask(context.Background(), task) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	ins := b.inspector()
	eventually(t, 30*time.Second, func() bool {
		for _, q := range []string{tasks.QueueCritical, tasks.QueueDefault, tasks.QueueLow} {
			qi, err := ins.GetQueueInfo(q)
			if err != nil {
				continue // queue not created
			}
			if qi.Size-qi.Completed > 0 { // completed tasks are kept (tasks.Retention*)
				return false
			}
		}
		return true
	}, "all tasks processed")

	require.EqualValues(t, 1, o.calls.Load(), "exactly one token-endpoint call")
	at, rt := o.current()
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State)
	require.Equal(t, state.HealthOK, c.Health)
	require.Equal(t, at, c.Credentials.AccessToken)
	require.Equal(t, rt, c.Credentials.RefreshToken)
	require.NotNil(t, c.Verdict)
	require.Equal(t, state.OutcomeValid, c.Verdict.Outcome)

	sum := func(f func(*Worker) float64) float64 { return f(w1) + f(w2) }
	require.Equal(t, 15.0, sum(func(w *Worker) float64 {
		return testutil.ToFloat64(w.metrics.checks.WithLabelValues("oco", outcomeValid))
	}), "every validation ended valid")
	require.Equal(t, 1.0, sum(func(w *Worker) float64 {
		return testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshRefreshed))
	}))
	require.Zero(t, sum(func(w *Worker) float64 {
		return testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", refreshRevoked))
	}))
	triggers := 0.0
	for _, o := range []string{refreshRefreshed, refreshLostRace, refreshSkipped} {
		n := sum(func(w *Worker) float64 { return testutil.ToFloat64(w.metrics.refreshes.WithLabelValues("oco", o)) })
		t.Logf("refresh outcome %s: %v", o, n)
		triggers += n
	}
	// Every refresh task goes through the refresh path once; a validation
	// does only when it ran before the new token was stored (it got the
	// 401), which depends on scheduling.
	require.GreaterOrEqual(t, triggers, 35.0, "every refresh task went through the refresh path")
	require.LessOrEqual(t, triggers, 50.0, "no trigger went through it twice")
	require.GreaterOrEqual(t, b.p.count("/oco/me"), 15+int(triggers)-35, "a validation that got the 401 checked again after the refresh")
	requireNoSecrets(t, b.logs.String())
}

func TestValidateRefreshesExpiredTokenFirst(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	b.putOAuth(-time.Minute)
	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, ocoID)))
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, 1, b.p.count("/oco/me"), "checked once, with the new token")
	c := b.get(ocoID)
	require.Equal(t, state.Callable, c.State)
	require.Equal(t, state.OutcomeValid, c.Verdict.Outcome)
	at, _ := o.current()
	require.Equal(t, at, c.Credentials.AccessToken)
}

func TestValidate401NearExpiryRevoked(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	o.rt = "another-token" // the stored refresh token is dead
	b.putOAuth(90 * time.Second)
	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, ocoID)))
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, 1, b.p.count("/oco/me"))
	c := b.get(ocoID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.ReasonRefreshTokenRevoked, c.Verdict.Reason)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues("oco", outcomeInvalid)))
}

func TestValidate401FreshTokenIsInvalid(t *testing.T) {
	b := setup(t)
	o := newOAuthAPI(b)
	// An hour left: a 401 is a verdict, not a reason to refresh.
	b.putOAuth(time.Hour)
	w := b.worker()
	require.NoError(t, process(t, w, validateTask(t, ocoID)))
	require.Zero(t, o.calls.Load())
	c := b.get(ocoID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.ReasonCredentialsRejected, c.Verdict.Reason)
}
