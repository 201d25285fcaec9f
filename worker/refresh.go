package worker

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// releaseLock deletes a lock only if it still holds the caller's token, so
// a holder whose lease ran out never releases its successor's lock.
var releaseLock = redis.NewScript(`
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0`)

// errClientCredentials means the environment variables the catalog names
// for the OAuth client credentials are empty: a fleet misconfiguration,
// retried (never a verdict against the consumer).
var errClientCredentials = errors.New("worker: oauth client credentials not configured")

// storeTokensAttempts bounds the writes of refreshed tokens.
const storeTokensAttempts = 5

// refreshOutcome is what one pass through the refresh path did.
type refreshOutcome struct {
	// outcome is refreshed, revoked, transient, skipped or lost_race.
	outcome string
	// conn is the latest connection read or written, if any.
	conn *state.Connection
	// skip says why nothing was done (outcome skipped).
	skip string
	// status and latency of the token request, if one was made.
	status  int
	latency time.Duration
	// reason is the verdict's reason (outcome revoked).
	reason string
	// dropped is set when a revoked verdict was not applied.
	dropped string
	// err is the error the task returns (transient: retry).
	err error
	msg string
}

func (w *Worker) lockKey(ref state.Ref) string {
	return w.cfg.KeyPrefix + ":lock:refresh:" + ref.String()
}

// lockLease outlasts one token request plus the store write that follows
// it, so the lock never expires under a holder that is still working.
func (w *Worker) lockLease() time.Duration {
	return w.cfg.TokenTimeout + storeWriteTimeout + 5*time.Second
}

// tryLock takes the refresh lock of a connection: SET NX PX with a random
// token.
func (w *Worker) tryLock(ctx context.Context, key string) (token string, ok bool, err error) {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	token = hex.EncodeToString(b)
	ok, err = w.rdb.SetNX(ctx, key, token, w.lockLease()).Result()
	return token, ok, err
}

// unlock releases the lock if it is still ours, whatever the task's
// context says.
func (w *Worker) unlock(ctx context.Context, key, token string) {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := releaseLock.Run(uctx, w.rdb, []string{key}, token).Err(); err != nil {
		w.log.WarnContext(uctx, "refresh lock release failed (it expires by itself)", slog.String("error", err.Error()))
	}
}

// waitUnlocked waits until the lock is released (or expires), polling with
// backoff, bounded by ctx and by one lease.
func (w *Worker) waitUnlocked(ctx context.Context, key string) error {
	deadline := time.Now().Add(w.lockLease() + time.Second)
	d := 5 * time.Millisecond
	for {
		n, err := w.rdb.Exists(ctx, key).Result()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("worker: refresh lock: %w", err)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return &RetryAfterError{After: jitter(time.Second), Err: ErrRefreshBusy}
		}
		if err := sleep(ctx, d); err != nil {
			return err
		}
		d = min(2*d, 200*time.Millisecond)
	}
}

// refreshWindow is how long before expiry c's token is refreshed: the
// integration's window for the token's lifetime, and never less than
// NearExpiry.
func (w *Worker) refreshWindow(c *state.Connection, in *catalog.Integration) time.Duration {
	return max(in.RefreshWindowFor(state.TokenLifetime(c.Credentials, in)), w.cfg.NearExpiry)
}

// refreshDue reports whether c's access token should be refreshed now.
func (w *Worker) refreshDue(c *state.Connection, in *catalog.Integration, now time.Time) bool {
	if !state.CanRefresh(c.Credentials, in) {
		return false
	}
	return state.TokenExpired(c.Credentials, now.Add(w.refreshWindow(c, in)))
}

// refresh is the one path by which tokens are refreshed, for refresh tasks
// and for checks alike. seen is the connection as the caller read it.
// Exactly one worker at a time refreshes a connection: the others wait for
// its lock and then find the token fresh.
func (w *Worker) refresh(ctx context.Context, in *catalog.Integration, seen *state.Connection) refreshOutcome {
	ref := seen.Ref()
	key := w.lockKey(ref)
	for {
		token, ok, err := w.tryLock(ctx, key)
		if err != nil {
			if ctx.Err() != nil {
				return refreshOutcome{outcome: refreshTransient, err: ctx.Err()}
			}
			return refreshOutcome{outcome: refreshTransient, err: fmt.Errorf("worker: refresh lock: %w", err), msg: "refresh lock unavailable"}
		}
		if ok {
			out := w.refreshLocked(ctx, in, ref, seen)
			w.unlock(ctx, key, token)
			return out
		}
		// Somebody else is refreshing: wait, then see what they left.
		waitStart := w.now()
		if err := w.waitUnlocked(ctx, key); err != nil {
			return refreshOutcome{outcome: refreshTransient, err: err, msg: "waiting for another worker's refresh"}
		}
		c, err := w.store.Get(ctx, ref)
		if errors.Is(err, state.ErrNotFound) {
			return refreshOutcome{outcome: refreshSkipped, skip: skipNotFound}
		}
		if err != nil {
			return refreshOutcome{outcome: refreshTransient, err: fmt.Errorf("worker: load connection: %w", err), msg: "store unavailable"}
		}
		if !w.refreshDue(c, in, w.now()) {
			return refreshOutcome{outcome: refreshLostRace, conn: c}
		}
		if revokedNow(c) {
			return refreshOutcome{outcome: refreshSkipped, skip: skipRevoked, conn: c}
		}
		if c.Refresh.Failures > 0 && !c.Refresh.LastAt.Before(waitStart) {
			// The refresh we waited for failed transiently just now: don't
			// hit the token endpoint again at once, retry later.
			msg := "token refresh failed in another worker just now"
			return refreshOutcome{outcome: refreshTransient, conn: c, msg: msg, err: errors.New("worker: " + msg)}
		}
		// Still due (the other worker's lease ran out, or it found nothing
		// to do): take the lock ourselves.
	}
}

// refreshLocked runs with the connection's refresh lock held.
func (w *Worker) refreshLocked(ctx context.Context, in *catalog.Integration, ref state.Ref, seen *state.Connection) refreshOutcome {
	c, err := w.store.Get(ctx, ref)
	switch {
	case errors.Is(err, state.ErrNotFound):
		return refreshOutcome{outcome: refreshSkipped, skip: skipNotFound}
	case err != nil:
		return refreshOutcome{outcome: refreshTransient, err: fmt.Errorf("worker: load connection: %w", err), msg: "store unavailable"}
	case !c.Enabled:
		return refreshOutcome{outcome: refreshSkipped, skip: skipDisabled, conn: c}
	case in.AuthType != catalog.AuthOAuth2:
		return refreshOutcome{outcome: refreshSkipped, skip: skipNotOAuth, conn: c}
	case !state.CanRefresh(c.Credentials, in):
		return refreshOutcome{outcome: refreshSkipped, skip: skipNoRefreshToken, conn: c}
	case revokedNow(c):
		return refreshOutcome{outcome: refreshSkipped, skip: skipRevoked, conn: c}
	}
	now := w.now()
	if !w.refreshDue(c, in, now) {
		if c.Credentials.AccessToken != seen.Credentials.AccessToken || c.Credentials.RefreshToken != seen.Credentials.RefreshToken {
			return refreshOutcome{outcome: refreshLostRace, conn: c}
		}
		return refreshOutcome{outcome: refreshSkipped, skip: skipNotDue, conn: c}
	}
	used := c.Credentials.RefreshToken
	start := time.Now()
	tok, status, err := w.exchange(ctx, in, c)
	lat := time.Since(start)
	out := refreshOutcome{status: status, latency: lat}
	if err == nil {
		return w.keepTokens(ctx, in, ref, used, tok, now, out)
	}
	if errors.Is(err, errMisconfigured) || revokedGrant(err) {
		return w.revoke(ctx, in, ref, used, err, now, out)
	}
	// Transient: provider trouble, timeouts, 429, our own configuration.
	out.outcome, out.msg = refreshTransient, "token refresh failed: "+safeErr(err)
	if errors.Is(err, errClientCredentials) {
		out.msg = err.Error()
		w.log.ErrorContext(ctx, "token refresh impossible: client credentials missing",
			slog.String(keyIntegration, in.ID), slog.String("client_id_env", in.OAuth.ClientIDEnv))
	}
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	ch, rerr := w.store.RecordRefreshFailure(sctx, ref, used, out.msg)
	if rerr == nil {
		out.conn = ch.After
		w.metrics.transition(in.ID, ch)
	}
	out.err = errors.New("worker: " + out.msg)
	if ra := retryAfterOf(err, now); ra > 0 {
		out.err = &RetryAfterError{After: ra, Err: out.err}
	}
	return out
}

// keepTokens stores the new tokens before anything else, retrying the
// write while its own deadline allows: tokens lost here lose the
// connection, since the provider may have rotated the refresh token.
func (w *Worker) keepTokens(ctx context.Context, in *catalog.Integration, ref state.Ref, used string, tok *oauth2.Token, now time.Time, out refreshOutcome) refreshOutcome {
	t := state.Tokens{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, IssuedAt: now}
	switch {
	case tok.ExpiresIn > 0:
		t.ExpiresAt = now.Add(time.Duration(tok.ExpiresIn) * time.Second)
	case !tok.Expiry.IsZero():
		t.ExpiresAt = tok.Expiry
	}
	// No expires_in (Salesforce): the store gives the token the catalog's
	// lifetime from IssuedAt.
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	var ch state.Change
	var err error
	// A few attempts ride out a Redis failover; refusals (stale, not
	// found) are final.
	for attempt, d := 1, 100*time.Millisecond; ; attempt, d = attempt+1, 2*d {
		ch, err = w.store.StoreTokens(sctx, ref, used, t)
		if err == nil || errors.Is(err, state.ErrStale) || errors.Is(err, state.ErrNotFound) ||
			attempt == storeTokensAttempts || sleep(sctx, d) != nil {
			break
		}
	}
	switch {
	case err == nil:
		out.outcome, out.conn = refreshRefreshed, ch.After
		w.metrics.transition(in.ID, ch)
	case errors.Is(err, state.ErrStale):
		// The consumer re-authorized while we refreshed: their tokens win.
		out.outcome = refreshLostRace
		w.log.WarnContext(ctx, "refreshed tokens dropped: credentials changed meanwhile", slog.String(keyIntegration, in.ID))
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
	default:
		out.outcome, out.msg = refreshTransient, "storing refreshed tokens failed"
		out.err = fmt.Errorf("worker: storing refreshed tokens: %w", err)
		w.log.ErrorContext(ctx, "refreshed tokens could not be stored", slog.String(keyIntegration, in.ID),
			slog.String(keyConnectionID, ref.ConnectionID), slog.String("error", err.Error()))
	}
	return out
}

// revoke applies the invalid verdict of a rejected refresh token, unless
// the refresh token changed meanwhile (another refresh won the race).
func (w *Worker) revoke(ctx context.Context, in *catalog.Integration, ref state.Ref, used string, cause error, now time.Time, out refreshOutcome) refreshOutcome {
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	c, err := w.store.Get(sctx, ref)
	switch {
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
		return out
	case err != nil:
		out.outcome, out.msg = refreshTransient, "store unavailable"
		out.err = fmt.Errorf("worker: load connection: %w", err)
		return out
	case c.Credentials.RefreshToken != used:
		out.outcome, out.conn = refreshLostRace, c
		return out
	}
	reason := state.ReasonRefreshTokenRevoked
	if errors.Is(cause, errMisconfigured) {
		reason = state.ReasonMisconfiguredAccount
	}
	out.msg, out.reason = safeErr(cause), reason
	v := state.Verdict{Outcome: state.InvalidCred, Reason: reason, HTTPStatus: out.status, CheckedAt: now, Revision: c.Revision}
	ch, err := w.store.ApplyVerdictFrom(sctx, c, v)
	switch {
	case err == nil:
		out.outcome, out.conn = refreshRevoked, ch.After
		w.metrics.transition(in.ID, ch)
	case errors.Is(err, state.ErrStale):
		out.outcome, out.dropped = refreshLostRace, dropStale
		w.metrics.dropped.WithLabelValues(dropStale).Inc()
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
	default:
		out.outcome, out.msg = refreshTransient, "store unavailable"
		out.err = fmt.Errorf("worker: apply verdict: %w", err)
	}
	return out
}

// exchange trades c's refresh token for new tokens at the integration's
// token endpoint with golang.org/x/oauth2. The request is not cut short by
// the task's cancellation (a shutdown): an answer the provider already
// gave, with a rotated refresh token, must not be thrown away.
func (w *Worker) exchange(ctx context.Context, in *catalog.Integration, c *state.Connection) (*oauth2.Token, int, error) {
	if in.OAuth == nil {
		return nil, 0, errors.New("worker: catalog has no oauth section for " + in.ID)
	}
	if in.GrantType() == catalog.GrantClientCredentials {
		return w.exchangeClientCredentials(ctx, in, c)
	}
	u, err := in.TokenURL(c.Settings)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: token url: %w", errMisconfigured, err)
	}
	id, secret := w.cfg.Getenv(in.OAuth.ClientIDEnv), w.cfg.Getenv(in.OAuth.ClientSecretEnv)
	if in.OAuth.ClientIDEnv == "" || id == "" {
		return nil, 0, fmt.Errorf("%w: $%s is empty", errClientCredentials, in.OAuth.ClientIDEnv)
	}
	style := oauth2.AuthStyleInHeader
	if in.OAuth.AuthStyle == "params" {
		style = oauth2.AuthStyleInParams
	}
	cfg := &oauth2.Config{
		ClientID:     id,
		ClientSecret: secret,
		Endpoint:     oauth2.Endpoint{TokenURL: u.String(), AuthStyle: style},
		Scopes:       in.OAuth.Scopes,
	}
	hc := w.httpClient(in)
	hc.Timeout = w.cfg.TokenTimeout
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.TokenTimeout)
	defer cancel()
	ectx = context.WithValue(ectx, oauth2.HTTPClient, hc)
	tok, err := cfg.TokenSource(ectx, &oauth2.Token{RefreshToken: c.Credentials.RefreshToken, Expiry: time.Unix(1, 0)}).Token()
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.Response != nil {
			return nil, re.Response.StatusCode, err
		}
		return nil, 0, err
	}
	return tok, http.StatusOK, nil
}

// revokedGrant reports whether a token endpoint error means the refresh
// token (or the client) is no longer accepted: invalid_grant,
// invalid_client, unauthorized_client (HubSpot: BAD_REFRESH_TOKEN). Only
// answers the provider gave on purpose count: never a 5xx or a 429.
func revokedGrant(err error) bool {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return false
	}
	if re.Response != nil && (re.Response.StatusCode >= 500 || re.Response.StatusCode == http.StatusTooManyRequests) {
		return false
	}
	switch re.ErrorCode {
	case "invalid_grant", "invalid_client", "unauthorized_client":
		return true
	case "":
		return bytes.Contains(re.Body, []byte("BAD_REFRESH_TOKEN"))
	}
	return false
}

// retryAfterOf returns the Retry-After of a token endpoint answer, if any.
func retryAfterOf(err error, now time.Time) time.Duration {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) && re.Response != nil {
		return parseRetryAfter(re.Response.Header, now)
	}
	return 0
}

// revokedNow reports whether c's current verdict says its refresh token
// was revoked: refreshing again is pointless until the consumer
// re-authorizes (which starts a new credentials revision).
func revokedNow(c *state.Connection) bool {
	v := c.Verdict
	return v != nil && v.Revision == c.Revision && v.Outcome == state.InvalidCred && v.Reason == state.ReasonRefreshTokenRevoked
}

// handleRefresh processes connection:refresh_token.
func (w *Worker) handleRefresh(ctx context.Context, t *asynq.Task) error {
	r := w.newRun(ctx, t)
	p, err := tasks.ParseConnectionPayload(t.Payload())
	if err != nil {
		r.res.Outcome, r.res.Error = "malformed", err.Error()
		return r.finish(ctx, fmt.Errorf("worker: %s: %w: %w", t.Type(), err, asynq.SkipRetry))
	}
	ref := state.Ref{ConsumerID: p.ConsumerID, ConnectionID: p.ConnectionID}
	r.consumerID, r.connectionID = ref.ConsumerID, ref.ConnectionID
	skip := func(integration, why string) error {
		r.res.Outcome, r.res.Skipped = refreshSkipped, why
		w.metrics.refreshes.WithLabelValues(integration, refreshSkipped).Inc()
		return r.finish(ctx, nil)
	}
	c, err := w.store.Get(ctx, ref)
	if errors.Is(err, state.ErrNotFound) {
		return skip(unknownLabel, skipNotFound)
	}
	if err != nil {
		r.res.Outcome, r.res.Error = refreshTransient, "store unavailable"
		return r.finish(ctx, fmt.Errorf("worker: load connection: %w", err))
	}
	r.before(c)
	in := w.integration(c.ServiceID)
	if in == nil {
		return skip(unknownLabel, skipUnknownService)
	}
	r.integration = in.ID
	switch {
	case !c.Enabled:
		return skip(in.ID, skipDisabled)
	case !in.Checkable():
		return skip(in.ID, skipNotCheckable)
	case in.AuthType != catalog.AuthOAuth2:
		return skip(in.ID, skipNotOAuth)
	case !state.CanRefresh(c.Credentials, in):
		return skip(in.ID, skipNoRefreshToken)
	case revokedNow(c):
		return skip(in.ID, skipRevoked)
	case !w.refreshDue(c, in, w.now()):
		return skip(in.ID, skipNotDue)
	}
	out := w.refresh(ctx, in, c)
	return r.finish(ctx, w.noteRefresh(ctx, r, in, out))
}

// noteRefresh counts a refresh outcome and copies it into the task's
// result; it returns the error the task should return.
func (w *Worker) noteRefresh(ctx context.Context, r *taskRun, in *catalog.Integration, out refreshOutcome) error {
	if ctx.Err() != nil && out.err != nil && errors.Is(out.err, ctx.Err()) {
		r.res.Outcome = taskCanceled
		return out.err
	}
	w.metrics.refreshes.WithLabelValues(in.ID, out.outcome).Inc()
	r.res.Outcome, r.res.Skipped, r.res.Dropped = out.outcome, out.skip, out.dropped
	if out.status != 0 {
		r.res.HTTPStatus = out.status
	}
	if out.latency > 0 {
		r.res.LatencyMS = max(out.latency.Milliseconds(), 1)
	}
	if out.outcome == refreshRevoked {
		r.res.Verdict, r.res.Reason = outcomeInvalid, out.reason
	}
	if out.outcome == refreshTransient {
		r.res.Error = out.msg
		var ra *RetryAfterError
		if errors.As(out.err, &ra) {
			r.res.RetryAfterMS = ra.After.Milliseconds()
		}
	}
	r.after(out.conn)
	return out.err
}
