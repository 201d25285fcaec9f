package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// skipUnreadable: the connection's credentials cannot be opened (sealed
// with a key no longer configured); the task is archived, not retried.
const skipUnreadable = "credentials_unreadable"

// handleValidate processes connection:validate.
func (w *Worker) handleValidate(ctx context.Context, t *asynq.Task) error {
	r, ref, err := w.connectionRun(ctx, t)
	if err != nil {
		return r.finish(ctx, err)
	}
	v := validation{w: w, r: r, ref: ref}
	return r.finish(ctx, v.run(ctx))
}

// loaded is a connection as read, or the error of reading it.
type loaded struct {
	c   *state.Connection
	err error
}

// validation is one run of the validation handler.
type validation struct {
	w   *Worker
	r   *taskRun
	ref state.Ref
	in  *catalog.Integration
	c   *state.Connection
	// rev is the credentials revision the check is made for.
	rev int64
	// refreshed is set once the token was refreshed (or found refreshed)
	// during this task: a second rejection is then a verdict.
	refreshed bool
	// pre is the connection as a batch read it (GetMany), used by the
	// first load instead of a read of its own.
	pre *loaded
	// deferValid, if set (a batch), takes a valid verdict instead of the
	// store: the batch writes them together (Store.ApplyVerdictsFrom).
	deferValid func(v *validation, verdict state.Verdict)
}

func (v *validation) integration() string {
	if v.in == nil {
		return unknownLabel
	}
	return v.in.ID
}

func (v *validation) skip(why string) error {
	v.r.res.Outcome, v.r.res.Skipped = outcomeSkipped, why
	v.w.metrics.checks.WithLabelValues(v.integration(), outcomeSkipped).Inc()
	return nil
}

// load reads the connection and decides whether there is anything to
// check; "" means there is.
func (v *validation) load(ctx context.Context) (skip string, err error) {
	var c *state.Connection
	if v.pre != nil {
		c, err = v.pre.c, v.pre.err
		v.pre = nil
	} else {
		c, err = v.w.store.Get(ctx, v.ref)
	}
	if errors.Is(err, state.ErrNotFound) {
		return skipNotFound, nil
	}
	if errors.Is(err, state.ErrUnreadable) {
		// Sealed with a key the keyring no longer holds: no retry can
		// help (the error names the key id, never a secret).
		v.r.res.Outcome, v.r.res.Skipped, v.r.res.Error = outcomeSkipped, skipUnreadable, err.Error()
		v.w.metrics.checks.WithLabelValues(unknownLabel, outcomeSkipped).Inc()
		return "", fmt.Errorf("worker: load connection: %w: %w", err, asynq.SkipRetry)
	}
	if err != nil {
		v.r.res.Outcome, v.r.res.Error = outcomeTransient, "store unavailable"
		return "", storeErr("load connection", err)
	}
	v.c, v.rev = c, c.Revision
	in := v.w.integration(c.ServiceID)
	if in == nil {
		return skipUnknownService, nil
	}
	v.in = in
	v.r.integration = in.ID
	switch {
	case !c.Enabled:
		return skipDisabled, nil
	case !in.Checkable():
		return skipNotCheckable, nil
	}
	// Derive afresh: the stored state was derived against the catalog of
	// its write.
	st, health := state.Derive(c, in, v.w.now())
	switch {
	case st == state.Available, st == state.Authorized:
		return skipNothingToCheck, nil
	case st == state.Added && (health == state.HealthNeedsAuth || health == state.HealthMissingSettings):
		return skipNothingToCheck, nil
	}
	return "", nil
}

func (v *validation) run(ctx context.Context) error {
	skip, err := v.load(ctx)
	if err != nil {
		return err
	}
	if v.c != nil {
		v.r.before(v.c)
	}
	if skip != "" {
		return v.skip(skip)
	}
	oauth := v.in.AuthType == catalog.AuthOAuth2
	if oauth && revokedNow(v.c) {
		// Its refresh token is dead (revoked, or a rotation the fleet
		// lost): only the consumer can help (re-authorizing starts a new
		// revision). A check now would only replace that verdict with a
		// vaguer one (the provider rejects the old access token too) and
		// send the next refresh back to the dead token.
		return v.skip(skipRevoked)
	}
	// An access token that has already expired is refreshed before the
	// check rather than after its certain rejection.
	if oauth && state.CanRefresh(v.c.Credentials, v.in) && state.TokenExpired(v.c.Credentials, v.w.now()) {
		if done, err := v.refreshFirst(ctx, false); done || err != nil {
			return err
		}
	}
	res, err := v.check(ctx)
	if err != nil {
		return err
	}
	// An OAuth check rejected while the token is at the end of its life,
	// or while an exchange of its refresh token by the fleet is in flight
	// or ended without an answer (the provider may have rotated both
	// tokens): refresh (exactly once, fleet wide) and check once more, so
	// the token endpoint's answer decides, not the stale access token.
	if oauth && !v.refreshed && res.kind == kindInvalid && res.status >= 400 &&
		state.CanRefresh(v.c.Credentials, v.in) &&
		(state.RefreshDue(v.c.Credentials, v.in, v.w.now()) || v.w.exchangeUnsettled(ctx, v.c)) {
		if done, err := v.refreshFirst(ctx, true); done || err != nil {
			return err
		}
		if res, err = v.check(ctx); err != nil {
			return err
		}
	}
	return v.apply(ctx, res)
}

// refreshFirst refreshes the connection's token through the shared path
// and re-loads the connection. done reports that the task is over (the
// refresh token was revoked, or the connection went away).
func (v *validation) refreshFirst(ctx context.Context, rejected bool) (done bool, err error) {
	out := v.w.refresh(ctx, v.in, v.c, rejected)
	v.refreshed = true
	if out.outcome == refreshTransient && ctx.Err() != nil {
		v.r.res.Outcome = taskCanceled
		return true, ctx.Err()
	}
	v.w.metrics.refreshes.WithLabelValues(v.in.ID, out.outcome).Inc()
	v.r.res.TokenRefresh = out.outcome
	switch out.outcome {
	case refreshRevoked, refreshRotationLost:
		v.r.res.Outcome, v.r.res.Verdict, v.r.res.Reason = outcomeInvalid, outcomeInvalid, out.reason
		v.r.res.HTTPStatus = out.status
		v.w.metrics.checks.WithLabelValues(v.in.ID, outcomeInvalid).Inc()
		v.r.after(out.conn)
		return true, nil
	case refreshTransient, refreshClientError, refreshHeld:
		// The refresh recorded its failure; the check waits for a token.
		v.r.res.Outcome, v.r.res.Error, v.r.res.HTTPStatus = outcomeTransient, out.msg, out.status
		v.w.metrics.checks.WithLabelValues(v.in.ID, outcomeTransient).Inc()
		v.r.after(out.conn)
		return true, out.err
	}
	// refreshed, lost_race (someone else refreshed), skipped: re-load.
	skip, err := v.load(ctx)
	if err != nil {
		return true, err
	}
	if skip != "" {
		return true, v.skip(skip)
	}
	return false, nil
}

// check sends one check through the integration's breaker and rate limit.
// An error means no verdict and no transient result: the task returns it
// (breaker open, rate limited, task cancelled, Redis unavailable).
func (v *validation) check(ctx context.Context) (checkResult, error) {
	w, in := v.w, v.in
	req, err := buildCheckRequest(ctx, in, v.c)
	if err != nil {
		// The settings point where the catalog forbids, or lack what the
		// URL needs: the account is misconfigured whatever the provider
		// would say. Nothing is sent.
		return checkResult{kind: kindInvalid, reason: state.ReasonMisconfiguredAccount, msg: safeErr(err)}, nil
	}
	done, err := w.breakers.allow(in.ID)
	if err != nil {
		v.r.res.Outcome, v.r.res.Skipped, v.r.res.Error = outcomeSkipped, skipCircuitOpen, "circuit breaker open"
		v.noteRetry(err)
		w.metrics.checks.WithLabelValues(in.ID, outcomeSkipped).Inc()
		return checkResult{}, err
	}
	if err := w.waitRateLimit(ctx, in); err != nil {
		done(errNotCounted)
		if errors.Is(err, ErrRateLimited) {
			v.r.res.Outcome, v.r.res.Error = outcomeRateLimited, "fleet rate limit of the integration reached"
			v.noteRetry(err)
			w.metrics.checks.WithLabelValues(in.ID, outcomeRateLimited).Inc()
		} else if ctx.Err() == nil {
			v.r.res.Outcome, v.r.res.Error = outcomeTransient, "rate limiter unavailable"
		}
		return checkResult{}, err
	}
	res, err := w.send(ctx, in, req)
	switch {
	case err != nil:
		done(errNotCounted)
		v.r.res.Outcome = taskCanceled
		return res, err
	case !res.sent, res.kind == kindMisconfigured:
		// The consumer's own doing: never the provider's trouble.
		done(errNotCounted)
	case res.kind == kindTransient || res.kind == kindThrottled:
		done(errProviderTrouble)
	default:
		done(nil)
	}
	if res.sent {
		w.metrics.checkDuration.WithLabelValues(in.ID).Observe(res.latency.Seconds())
	}
	return res, nil
}

// dropped reports whether a write's err means the task is over without
// effect, and records why: the credentials changed (ErrStale: a
// validation of the new ones is queued already) or the connection is gone.
func (v *validation) dropped(err error) bool {
	switch {
	case errors.Is(err, state.ErrStale):
		v.r.res.Dropped = dropStale
		v.w.metrics.dropped.WithLabelValues(dropStale).Inc()
		return true
	case errors.Is(err, state.ErrNotFound):
		v.r.res.Dropped = skipNotFound
		return true
	}
	return false
}

func (v *validation) noteRetry(err error) {
	var ra *RetryAfterError
	if errors.As(err, &ra) {
		v.r.res.RetryAfterMS = ra.After.Milliseconds()
	}
}

// apply records the check's result: a verdict with compare-and-set on the
// revision read before the check, or a transient failure (and the task
// returns an error so that asynq retries it).
func (v *validation) apply(ctx context.Context, res checkResult) error {
	w, in, r := v.w, v.in, v.r
	r.res.Outcome = res.kind.String()
	r.res.HTTPStatus = res.status
	if res.sent {
		r.res.LatencyMS = max(res.latency.Milliseconds(), 1)
	}
	w.metrics.checks.WithLabelValues(in.ID, r.res.Outcome).Inc()
	sctx, cancel := storeCtx(ctx)
	defer cancel()
	now := w.now()

	// A wave of connections turning invalid across one integration looks
	// like a provider auth incident: where the catalog asks for it, hold
	// the flip back as a transient failure and check again later. Only a
	// provider's answer that would flip the connection counts (guardFlip);
	// the check still counts as invalid above, so the InvalidationWave
	// alert sees the wave.
	if res.kind == kindInvalid && res.sent {
		flip := state.Verdict{Outcome: state.OutcomeInvalid, Reason: res.reason, HTTPStatus: res.status, CheckedAt: now, Revision: v.rev}
		if held, after := w.guardFlip(sctx, in, v.c, flip, now); held {
			res.kind, res.msg, res.retryAfter = kindTransient, heldMessage(in), after
			r.res.Outcome = outcomeHeld
		}
	}

	if res.kind == kindMisconfigured {
		// The consumer's own settings make the check fail (a host that
		// does not resolve or refuses connections, a refused redirect):
		// that connection's problem alone, shown as its health; state
		// kept. The task is done: the periodic check looks again, and a
		// change of settings validates at once.
		r.res.Error = res.msg
		ch, err := w.store.RecordMisconfigured(sctx, v.ref, v.rev, res.msg)
		switch {
		case errors.Is(err, state.ErrStale):
			r.res.Dropped = dropStale
			w.metrics.dropped.WithLabelValues(dropStale).Inc()
		case errors.Is(err, state.ErrNotFound):
			r.res.Dropped = skipNotFound
		case err != nil:
			return storeErr("record misconfigured check", err)
		default:
			r.after(ch.After)
		}
		return nil
	}

	if res.kind == kindTransient || res.kind == kindThrottled {
		r.res.Error = res.msg
		ch, err := w.store.RecordTransient(sctx, v.ref, v.rev, res.msg)
		switch {
		case v.dropped(err):
			return nil
		case err != nil:
			w.log.WarnContext(ctx, "recording a transient failure failed", slog.String(keyIntegration, in.ID),
				slog.String("error", err.Error()))
		default:
			r.after(ch.After)
		}
		terr := fmt.Errorf("worker: check %s: %s", in.ID, res.msg)
		if res.retryAfter > 0 {
			r.res.RetryAfterMS = res.retryAfter.Milliseconds()
			return &RetryAfterError{After: res.retryAfter, Err: terr}
		}
		return terr
	}

	verdict := state.Verdict{Outcome: state.OutcomeValid, Reason: res.reason, HTTPStatus: res.status, CheckedAt: now, Revision: v.rev}
	if res.kind == kindInvalid {
		verdict.Outcome = state.OutcomeInvalid
		if res.msg != "" {
			r.res.Error = res.msg
		}
	}
	r.res.Verdict, r.res.Reason = string(verdict.Outcome), verdict.Reason
	if v.deferValid != nil && verdict.Outcome == state.OutcomeValid {
		v.deferValid(v, verdict)
		return nil
	}
	ch, err := w.store.ApplyVerdictFrom(sctx, v.c, verdict)
	switch {
	case v.dropped(err):
		return nil
	case err != nil:
		return storeErr("apply verdict", err)
	}
	w.metrics.transition(in.ID, ch)
	r.after(ch.After)
	if verdict.Outcome == state.OutcomeInvalid {
		v.confirmLater(ctx, ch.After)
	}
	return nil
}

// confirmLater enqueues the next confirming check of an invalid verdict the
// store holds back (catalog confirm_invalid), as the policy says
// (state.ConfirmTask): ConfirmSpacing from now, one task per step however
// many tasks see it. The check index holds the connection back meanwhile.
func (v *validation) confirmLater(ctx context.Context, c *state.Connection) {
	spec, ok := state.ConfirmTask(c, v.in, v.rev)
	if !ok {
		return
	}
	t, opts, err := spec.New()
	if err != nil {
		return
	}
	ectx, cancel := storeCtx(ctx)
	defer cancel()
	if _, err := v.w.enqueuer.EnqueueContext(ectx, t, opts...); err != nil && !errors.Is(err, asynq.ErrTaskIDConflict) {
		v.w.log.WarnContext(ctx, "enqueueing a confirming check failed", slog.String(keyIntegration, v.in.ID),
			slog.String(keyConnectionID, v.ref.ConnectionID), slog.String("error", err.Error()))
	}
}
