package worker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
)

// errClientCredentials means the environment variables the catalog names
// for the OAuth client credentials are empty: a fleet misconfiguration,
// retried (never a verdict against the consumer).
var errClientCredentials = errors.New("worker: oauth client credentials not configured")

// errClientRejected means the token endpoint rejected the fleet's own OAuth
// client (invalid_client, unauthorized_client): an incident of the
// integration, never a verdict on a connection.
var errClientRejected = errors.New("worker: the provider rejected the fleet's oauth client credentials")

// errStoreUnavailable marks failures to reach Redis: the task is retried
// soon (see RetryDelay), not after a provider's backoff.
var errStoreUnavailable = errors.New("worker: store unavailable")

// storeErr wraps a store error of step what: one that says Redis could not
// serve is marked errStoreUnavailable (retried soon, no retry used up);
// others (an unreadable record, a refused write) keep their own meaning.
func storeErr(what string, err error) error {
	if state.Unavailable(err) {
		return fmt.Errorf("%w: %s: %w", errStoreUnavailable, what, err)
	}
	return fmt.Errorf("worker: %s: %w", what, err)
}

// refreshOutcome is what one pass through the refresh path did.
type refreshOutcome struct {
	// outcome is one of the refresh* outcomes.
	outcome string
	// conn is the latest connection read or written, if any.
	conn *state.Connection
	// skip says why nothing was done (outcome skipped).
	skip string
	// status and latency of the token request, if one was made.
	status  int
	latency time.Duration
	// reason is the verdict's reason (outcome revoked or rotation_lost).
	reason string
	// dropped is set when a revoked verdict was not applied.
	dropped string
	// err is the error the task returns (transient: retry).
	err error
	msg string
}

func transientOut(msg string, err error) refreshOutcome {
	return refreshOutcome{outcome: refreshTransient, msg: msg, err: err}
}

// leaseTTL is the refresh lease's time to live; the holder extends it every
// third of that while it works, so it lapses only if the holder dies or
// Redis stalls for longer.
const leaseTTL = 15 * time.Second

// intentMaxAge is how long another holder's exchange intent is presumed
// alive (its holder may still be persisting the tokens): the longest an
// exchange plus its persisting can take, and a margin.
func (w *Worker) intentMaxAge() time.Duration {
	return w.cfg.TokenTimeout + w.cfg.PersistTimeout + 30*time.Second
}

// exchangeUnsettled reports whether an exchange of c's current refresh
// token by the fleet is in flight or ended without an answer. A store
// error counts as no.
func (w *Worker) exchangeUnsettled(ctx context.Context, c *state.Connection) bool {
	_, lineage, _, _, err := w.store.Intent(ctx, c.Ref())
	return err == nil && lineage != "" && lineage == state.Lineage(c.Credentials.RefreshToken)
}

// dueFor reports whether c (as just read) needs a refresh: its token is
// due, or the provider rejected the access token the caller saw and c
// still holds that same token.
func (w *Worker) dueFor(c, seen *state.Connection, in *catalog.Integration, rejected bool) bool {
	if state.RefreshDue(c.Credentials, in, w.now()) {
		return true
	}
	return rejected && state.CanRefresh(c.Credentials, in) && c.Credentials.AccessToken == seen.Credentials.AccessToken
}

// refresh is the one path by which tokens are refreshed, for refresh tasks
// and for checks alike. seen is the connection as the caller read it.
// Exactly one worker at a time refreshes a connection: the others wait for
// its lease and then find the token fresh. The protocol is written down in
// the README (Token refresh).
//
// rejected says the provider has just rejected seen's access token (a
// check's 401): the token is then due whatever its expiry says, as long
// as nobody has replaced it meanwhile.
func (w *Worker) refresh(ctx context.Context, in *catalog.Integration, seen *state.Connection, rejected bool) refreshOutcome {
	ref := seen.Ref()
	if until, paused := w.clientErrorPause(in.ID); paused {
		msg := "refreshes of " + in.ID + " paused: the provider rejects the fleet's oauth client credentials"
		return transientOut(msg, &RetryAfterError{After: jitter(until), Err: ErrCircuitOpen})
	}
	for {
		lease, err := w.store.AcquireRefresh(ctx, ref, leaseTTL)
		if err == nil {
			out := w.refreshLeased(ctx, in, ref, seen, lease, rejected)
			uctx, cancel := storeCtx(ctx)
			if err := w.store.ReleaseRefresh(uctx, lease); err != nil {
				w.log.WarnContext(uctx, "refresh lease release failed (it expires by itself)", slog.String("error", err.Error()))
			}
			cancel()
			return out
		}
		if !errors.Is(err, state.ErrRefreshLocked) {
			if ctx.Err() != nil {
				return refreshOutcome{outcome: refreshTransient, err: ctx.Err()}
			}
			return transientOut("refresh lease unavailable", storeErr("refresh lease", err))
		}
		// Somebody else is refreshing: wait, then see what they left.
		waitStart := w.now()
		if err := w.waitUnlocked(ctx, ref); err != nil {
			return transientOut("waiting for another worker's refresh", err)
		}
		c, err := w.store.Get(ctx, ref)
		if errors.Is(err, state.ErrNotFound) {
			return refreshOutcome{outcome: refreshSkipped, skip: skipNotFound}
		}
		if err != nil {
			return transientOut("store unavailable", storeErr("load connection", err))
		}
		if !w.dueFor(c, seen, in, rejected) {
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
		// to do): take the lease ourselves.
	}
}

// waitUnlocked waits until the lease is released (or expires), polling
// with backoff, bounded by ctx and by a few lease lifetimes.
func (w *Worker) waitUnlocked(ctx context.Context, ref state.Ref) error {
	deadline := time.Now().Add(2 * leaseTTL)
	d := 5 * time.Millisecond
	for {
		locked, err := w.store.RefreshLocked(ctx, ref)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return storeErr("refresh lease", err)
		}
		if !locked {
			return nil
		}
		if time.Now().After(deadline) {
			return &RetryAfterError{After: jitter(time.Second), Err: ErrRefreshBusy}
		}
		if err := retry.Sleep(ctx, d); err != nil {
			return err
		}
		d = min(2*d, 200*time.Millisecond)
	}
}

// keepLease extends lease every third of its TTL until stop is called. A
// lease that could not be extended is not fatal: the intent still fences
// the exchange in flight, and fenced writes say whether we still own it.
func (w *Worker) keepLease(ctx context.Context, lease *state.RefreshLease) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(leaseTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), leaseTTL/3)
				err := w.store.ExtendRefresh(ectx, lease, leaseTTL)
				cancel()
				if err != nil && w.errLog.Allow() {
					w.log.WarnContext(ctx, "refresh lease not extended", slog.String("error", err.Error()))
				}
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// refreshLeased runs with the connection's refresh lease held.
func (w *Worker) refreshLeased(ctx context.Context, in *catalog.Integration, ref state.Ref, seen *state.Connection, lease *state.RefreshLease, rejected bool) refreshOutcome {
	stop := w.keepLease(ctx, lease)
	defer stop()
	c, err := w.store.Get(ctx, ref)
	switch {
	case errors.Is(err, state.ErrNotFound):
		return refreshOutcome{outcome: refreshSkipped, skip: skipNotFound}
	case err != nil:
		return transientOut("store unavailable", storeErr("load connection", err))
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
	if !w.dueFor(c, seen, in, rejected) {
		if c.Credentials.AccessToken != seen.Credentials.AccessToken || c.Credentials.RefreshToken != seen.Credentials.RefreshToken {
			return refreshOutcome{outcome: refreshLostRace, conn: c}
		}
		return refreshOutcome{outcome: refreshSkipped, skip: skipNotDue, conn: c}
	}
	// The provider's breaker and the fleet-wide rate limit hold for token
	// endpoints as for checks.
	done, err := w.breakers.allow(in.ID)
	if err != nil {
		return refreshOutcome{outcome: refreshTransient, conn: c, msg: "circuit breaker open", err: err}
	}
	if err := w.waitRateLimit(ctx, in); err != nil {
		done(errNotCounted)
		return refreshOutcome{outcome: refreshTransient, conn: c, msg: "fleet rate limit of the integration reached", err: err}
	}
	// Step: no exchange starts once shutdown began.
	if !w.startExchange() {
		done(errNotCounted)
		return refreshOutcome{outcome: refreshTransient, conn: c, msg: "worker shutting down",
			err: &RetryAfterError{After: time.Second, Err: ErrRefreshBusy}}
	}
	defer w.exchanges.Done()
	used := c.Credentials.RefreshToken
	// Step: record the intent (lineage, time) before calling the provider.
	prior, err := w.store.BeginExchange(ctx, lease, state.Lineage(used), w.intentMaxAge())
	switch {
	case errors.Is(err, state.ErrExchangeInFlight):
		done(errNotCounted)
		return refreshOutcome{outcome: refreshTransient, conn: c, msg: "another worker's token exchange may still be persisting",
			err: &RetryAfterError{After: jitter(5 * time.Second), Err: ErrRefreshBusy}}
	case err != nil:
		done(errNotCounted)
		// Without a reply, BeginExchange has abandoned the exchange
		// (state.fence_abandon.lua): no intent of ours stays in flight.
		return refreshOutcome{outcome: refreshTransient, conn: c, msg: "could not record the exchange intent",
			err: storeErr("refresh lease", err)}
	}
	unknownBefore := prior.Unknown && prior.Lineage == state.Lineage(used)

	start := time.Now()
	tok, status, err := w.exchange(ctx, in, c)
	lat := time.Since(start)
	out := refreshOutcome{status: status, latency: lat, conn: c}
	switch {
	case err == nil:
		done(nil)
		return w.keepTokens(ctx, in, lease, used, tok, now, out)
	case errors.Is(err, errMisconfigured):
		done(errNotCounted)
		w.settle(ctx, lease, true)
		return w.revoke(ctx, in, lease, used, err, state.ReasonMisconfiguredAccount, now, out)
	case clientRejected(err) && fleetClient(in):
		done(errNotCounted)
		w.settle(ctx, lease, true)
		return w.clientRejected(ctx, in, out)
	case clientRejected(err):
		// The client id and secret are the connection's own credentials
		// (client-credentials grant): a verdict on that connection.
		done(nil)
		return w.revoke(ctx, in, lease, used, err, state.ReasonRefreshTokenRevoked, now, out)
	case revokedGrant(err):
		done(nil)
		reason := state.ReasonRefreshTokenRevoked
		if unknownBefore {
			reason = state.ReasonRotationLost
		}
		return w.revoke(ctx, in, lease, used, err, reason, now, out)
	}
	// Transient: provider trouble, timeouts, 429, our own configuration.
	answered := status != 0
	if answered && status != http.StatusTooManyRequests && status < 500 {
		done(errNotCounted)
	} else if errors.Is(err, errClientCredentials) {
		done(errNotCounted)
	} else {
		done(errProviderTrouble)
	}
	// A request that got no answer may have reached the provider and
	// rotated the token: its outcome stays unknown in the intent.
	w.settle(ctx, lease, answered || errors.Is(err, errClientCredentials) || dialFailed(err))
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

// settle ends our exchange intent without a write: known clears it,
// otherwise its outcome is recorded as unknown.
func (w *Worker) settle(ctx context.Context, lease *state.RefreshLease, known bool) {
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	if err := w.store.SettleExchange(sctx, lease, known); err != nil && w.errLog.Allow() {
		w.log.WarnContext(ctx, "exchange intent not settled (it ages out)", slog.String("error", err.Error()))
	}
}

// dialFailed reports whether err happened before any byte was sent (the
// provider cannot have rotated anything).
func dialFailed(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// keepTokens stores the new tokens before anything else. The write is
// fenced by our exchange intent and retried with backoff for up to
// PersistTimeout while the lease is kept alive: tokens lost here lose the
// connection, since the provider has rotated the refresh token.
func (w *Worker) keepTokens(ctx context.Context, in *catalog.Integration, lease *state.RefreshLease, used string, tok *oauth2.Token, now time.Time, out refreshOutcome) refreshOutcome {
	t := state.Tokens{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, IssuedAt: now}
	switch {
	case tok.ExpiresIn > 0:
		t.ExpiresAt = now.Add(time.Duration(tok.ExpiresIn) * time.Second)
	case !tok.Expiry.IsZero():
		t.ExpiresAt = tok.Expiry
	}
	// No expires_in (Salesforce): the store gives the token the catalog's
	// lifetime from IssuedAt.
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.PersistTimeout)
	defer cancel()
	var ch state.Change
	var err error
	retried := false
	for d := 100 * time.Millisecond; ; d = min(2*d, 3*time.Second) {
		actx, acancel := context.WithTimeout(pctx, storeWriteTimeout)
		ch, err = w.store.StoreRefreshedTokens(actx, lease, used, t)
		acancel()
		if err == nil || !state.Unavailable(err) {
			// Stored, or refused for good (stale, gone, fenced, unreadable):
			// only Redis being away is worth waiting out.
			break
		}
		retried = true
		if retry.Sleep(pctx, jitter(d)) != nil {
			break
		}
	}
	if retried {
		label := "stored"
		if err != nil {
			label = "failed"
		}
		w.metrics.tokenWrites.WithLabelValues(label).Inc()
	}
	switch {
	case err == nil:
		out.outcome, out.conn = refreshRefreshed, ch.After
		w.metrics.transition(in.ID, ch)
	case errors.Is(err, state.ErrStale):
		// The consumer re-authorized while we refreshed: their tokens win.
		out.outcome = refreshLostRace
		w.log.WarnContext(ctx, "refreshed tokens dropped: credentials changed meanwhile", slog.String(keyIntegration, in.ID))
		w.settle(ctx, lease, true)
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
		w.settle(ctx, lease, true)
	default:
		// Fenced (another holder took over after our intent aged out) or
		// Redis unreachable for PersistTimeout: the outcome is lost to us.
		out.outcome, out.msg = refreshTransient, "storing refreshed tokens failed"
		out.err = storeErr("storing refreshed tokens", err)
		w.log.ErrorContext(ctx, "refreshed tokens could not be stored", slog.String(keyIntegration, in.ID),
			slog.String(keyConnectionID, lease.Ref().ConnectionID), slog.Duration("persist_timeout", w.cfg.PersistTimeout),
			slog.String("error", err.Error()))
		w.settle(ctx, lease, false)
	}
	return out
}

// revoke applies the invalid verdict of a rejected refresh token, under the
// fence, unless the refresh token changed meanwhile (another refresh won
// the race) or the invalid-wave guard holds it back.
func (w *Worker) revoke(ctx context.Context, in *catalog.Integration, lease *state.RefreshLease, used string, cause error, reason string, now time.Time, out refreshOutcome) refreshOutcome {
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	c, err := w.store.Get(sctx, lease.Ref())
	switch {
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
		return out
	case err != nil:
		w.settle(ctx, lease, false)
		out.outcome, out.msg = refreshTransient, "store unavailable"
		out.err = storeErr("load connection", err)
		return out
	case c.Credentials.RefreshToken != used:
		w.settle(ctx, lease, true)
		out.outcome, out.conn = refreshLostRace, c
		return out
	}
	out.msg, out.reason = safeErr(cause), reason
	v := state.Verdict{Outcome: state.OutcomeInvalid, Reason: reason, HTTPStatus: out.status, CheckedAt: now, Revision: c.Revision}
	if reason == state.ReasonRotationLost {
		w.metrics.rotationsLost.WithLabelValues(in.ID).Inc()
		w.log.ErrorContext(ctx, "token rotation lost: invalid_grant for a refresh token whose earlier exchange had an unknown outcome",
			slog.String(keyIntegration, in.ID), slog.String(keyConnectionID, c.ID))
	} else if held, after := w.guardFlip(sctx, in, c, v, now); held {
		// A wave of revocations across one integration looks like a
		// provider incident: keep the state, try again after the window.
		w.settle(ctx, lease, true)
		out.outcome, out.conn = refreshHeld, c
		out.msg = "revocation held back: wave of invalid verdicts for " + in.ID
		out.err = &RetryAfterError{After: after, Err: errors.New("worker: " + out.msg)}
		return out
	}
	ch, err := w.store.RevokeRefresh(sctx, lease, c, v)
	switch {
	case err == nil:
		out.outcome, out.conn = refreshRevoked, ch.After
		if reason == state.ReasonRotationLost {
			out.outcome = refreshRotationLost
		}
		w.metrics.transition(in.ID, ch)
	case errors.Is(err, state.ErrStale):
		out.outcome, out.dropped = refreshLostRace, dropStale
		w.metrics.dropped.WithLabelValues(dropStale).Inc()
	case errors.Is(err, state.ErrFenced):
		// Somebody else owns the refresh now: their outcome decides.
		out.outcome = refreshLostRace
	case errors.Is(err, state.ErrNotFound):
		out.outcome, out.skip = refreshSkipped, skipNotFound
	default:
		w.settle(ctx, lease, true)
		out.outcome, out.msg = refreshTransient, "store unavailable"
		out.err = storeErr("apply verdict", err)
	}
	return out
}

// clientRejected handles invalid_client / unauthorized_client: the
// fleet's own OAuth client credentials are wrong. No connection is
// flipped; the integration's refreshes pause, and the operator is told
// which environment variable holds the secret.
func (w *Worker) clientRejected(ctx context.Context, in *catalog.Integration, out refreshOutcome) refreshOutcome {
	w.metrics.clientErrors.WithLabelValues(in.ID).Inc()
	w.clientErrMu.Lock()
	w.clientErrUntil[in.ID] = time.Now().Add(w.cfg.ClientErrorPause)
	w.clientErrMu.Unlock()
	if w.errLog.Allow() {
		w.log.ErrorContext(ctx, "the provider rejects the fleet's oauth client credentials: refreshes of this integration pause; fix the client id/secret",
			slog.String(keyIntegration, in.ID), slog.String("client_id_env", in.OAuth.ClientIDEnv),
			slog.String("client_secret_env", in.OAuth.ClientSecretEnv), slog.Duration("pause", w.cfg.ClientErrorPause))
	}
	out.outcome, out.msg = refreshClientError, "the provider rejects the fleet's oauth client credentials"
	out.err = &RetryAfterError{After: jitter(w.cfg.ClientErrorPause), Err: fmt.Errorf("%w (%s)", errClientRejected, in.ID)}
	return out
}

// fleetClient reports whether the integration's OAuth client is the
// fleet's own (named by the catalog's environment variables) rather than
// credentials each connection brings.
func fleetClient(in *catalog.Integration) bool {
	_, _, fromEnv := in.ClientFor(func(string) string { return "" }, func(string) string { return "" })
	return fromEnv
}

// clientErrorPause reports whether the integration's refreshes are paused
// after a client rejection, and for how much longer.
func (w *Worker) clientErrorPause(integration string) (time.Duration, bool) {
	w.clientErrMu.Lock()
	defer w.clientErrMu.Unlock()
	d := time.Until(w.clientErrUntil[integration])
	return d, d > 0
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
	cfg := &oauth2.Config{
		ClientID:     id,
		ClientSecret: secret,
		Endpoint:     oauth2.Endpoint{TokenURL: u.String(), AuthStyle: authStyle(in)},
		Scopes:       in.OAuth.Scopes,
	}
	return w.tokenCall(ctx, in, func(ctx context.Context) (*oauth2.Token, error) {
		return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: c.Credentials.RefreshToken, Expiry: time.Unix(1, 0)}).Token()
	})
}

// revokedGrant reports whether a token endpoint error means the refresh
// token is no longer accepted: invalid_grant (HubSpot: BAD_REFRESH_TOKEN). Only
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
	case "invalid_grant":
		return true
	case "":
		return bytes.Contains(re.Body, []byte("BAD_REFRESH_TOKEN"))
	}
	return false
}

// clientRejected reports whether a token endpoint error rejects the
// fleet's own OAuth client (invalid_client, unauthorized_client).
func clientRejected(err error) bool {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return false
	}
	if re.Response != nil && (re.Response.StatusCode >= 500 || re.Response.StatusCode == http.StatusTooManyRequests) {
		return false
	}
	return re.ErrorCode == "invalid_client" || re.ErrorCode == "unauthorized_client"
}

// retryAfterOf returns the Retry-After of a token endpoint answer, if any.
func retryAfterOf(err error, now time.Time) time.Duration {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) && re.Response != nil {
		return retry.HeaderAfter(re.Response.Header, now)
	}
	return 0
}

// revokedNow reports whether c's current verdict says its refresh token
// was revoked: refreshing again is pointless until the consumer
// re-authorizes (which starts a new credentials revision).
func revokedNow(c *state.Connection) bool {
	v := c.Verdict
	return v != nil && v.Revision == c.Revision && v.Outcome == state.OutcomeInvalid &&
		(v.Reason == state.ReasonRefreshTokenRevoked || v.Reason == state.ReasonRotationLost)
}

// handleRefresh processes connection:refresh_token.
func (w *Worker) handleRefresh(ctx context.Context, t *asynq.Task) error {
	r, ref, err := w.connectionRun(ctx, t)
	if err != nil {
		return r.finish(ctx, err)
	}
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
		return r.finish(ctx, storeErr("load connection", err))
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
	case !state.RefreshDue(c.Credentials, in, w.now()):
		return skip(in.ID, skipNotDue)
	}
	out := w.refresh(ctx, in, c, false)
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
	switch out.outcome {
	case refreshRevoked, refreshRotationLost:
		r.res.Verdict, r.res.Reason = outcomeInvalid, out.reason
	case refreshTransient, refreshClientError, refreshHeld:
		r.res.Error = out.msg
		var ra *RetryAfterError
		if errors.As(out.err, &ra) {
			r.res.RetryAfterMS = ra.After.Milliseconds()
		}
	}
	r.after(out.conn)
	return out.err
}
