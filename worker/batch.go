package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Batch outcomes: what a connection:validate_batch did, in its result.
const (
	// outcomeChecked: every member has its result (a verdict, a skip, a
	// misconfigured account).
	outcomeChecked = "checked"
	// outcomeAlreadyChecked counts members checked since their due time
	// (by an earlier attempt of the same batch, or on demand): a retried
	// batch checks only the members still waiting.
	outcomeAlreadyChecked = "already_checked"
)

// maxDeferred is how many valid verdicts a batch holds before it writes
// them (one pipeline): enough to share a round trip, few enough that a
// batch at a slow provider does not hold all its members' connections.
const maxDeferred = 16

// maxDeferredAge bounds how long a valid verdict waits for others: at a
// fast provider a batch's verdicts share round trips; at a slow one
// (100 ms a check) each is written when it is known, and a batch holds
// one member's connection at a time, not many.
const maxDeferredAge = 20 * time.Millisecond

// readChunk is how many members a batch reads in one round trip.
const readChunk = 25

// BatchResult is what a batch did, member by member in sums, in its
// Result. It holds ids only.
type BatchResult struct {
	Members int `json:"members"`
	// Outcomes counts the members by the outcome a connection:validate
	// would report (valid, invalid, transient, skipped, ...), plus
	// already_checked.
	Outcomes map[string]int `json:"outcomes"`
	// Changed lists the members whose state or health the batch changed.
	Changed []BatchChange `json:"changed,omitempty"`
	// Waiting lists the members without a result yet: the batch is
	// retried for them (the others are not checked again).
	Waiting []string `json:"waiting,omitempty"`
}

// BatchChange is one member whose state or health changed.
type BatchChange struct {
	Ref          string `json:"ref"`
	StateBefore  string `json:"state_before,omitempty"`
	StateAfter   string `json:"state_after,omitempty"`
	HealthBefore string `json:"health_before,omitempty"`
	HealthAfter  string `json:"health_after,omitempty"`
}

// handleValidateBatch processes connection:validate_batch: the periodic
// checks of one integration's connections in one task. The members are
// read readChunk per round trip; each is then checked and its result applied
// exactly as connection:validate would (the same code: refresh first,
// breaker, rate limit, wave guard, confirmation, compare-and-set on the
// revision it read), one after another, so the worker's concurrency still
// bounds the requests in flight.
//
// A member without a result (provider trouble, the breaker or the rate
// limit holding it back) makes the batch fail, so that asynq retries it
// with the delay that member asks for; a retry skips the members checked
// since their due time. The breaker or the rate limit stops the batch at
// once (the rest would be held back too), and so does Redis being away.
func (w *Worker) handleValidateBatch(ctx context.Context, t *asynq.Task) error {
	r := w.newRun(ctx, t)
	p, err := tasks.ParseBatchPayload(t.Payload())
	if err != nil {
		r.res.Outcome, r.res.Error = "malformed", err.Error()
		return r.finish(ctx, fmt.Errorf("worker: %s: %w: %w", t.Type(), err, asynq.SkipRetry))
	}
	r.integration = p.ServiceID
	members := p.Members()
	refs := make([]state.Ref, len(members))
	for i, m := range members {
		refs[i] = state.Ref{ConsumerID: m.ConsumerID, ConnectionID: m.ConnectionID}
	}
	br := &BatchResult{Members: len(members), Outcomes: map[string]int{}}
	r.res.Batch = br
	// The members are read readChunk at a time, in one round trip each:
	// a batch at a slow provider holds a few dozen members' records, not
	// all of them.
	var got []state.Got
	read := func(i int) error {
		if i%readChunk != 0 {
			return nil
		}
		sctx, cancel := storeCtx(ctx)
		defer cancel()
		var err error
		got, err = w.store.GetMany(sctx, refs[i:min(i+readChunk, len(refs))])
		return err
	}

	var failed error
	var after time.Duration
	// done counts a member's result and logs its line.
	done := func(i int, mr *taskRun, err error) {
		mr.res.At, mr.res.DurationMS = w.now().UTC(), time.Since(mr.start).Milliseconds()
		mr.log(ctx, err, true)
		outcome := mr.res.Outcome
		if outcome == outcomeSkipped && mr.res.Skipped != "" {
			outcome += ":" + mr.res.Skipped
		}
		br.Outcomes[outcome]++
		if mr.res.StateBefore != mr.res.StateAfter || mr.res.HealthBefore != mr.res.HealthAfter {
			br.Changed = append(br.Changed, BatchChange{Ref: refs[i].String(),
				StateBefore: mr.res.StateBefore, StateAfter: mr.res.StateAfter,
				HealthBefore: mr.res.HealthBefore, HealthAfter: mr.res.HealthAfter})
		}
	}
	// Valid verdicts wait here and go to the store together.
	type validOne struct {
		i       int
		mr      *taskRun
		v       *validation
		verdict state.Verdict
	}
	var valid []validOne
	// flush writes the waiting valid verdicts; an error means Redis is
	// away (the batch is retried; what was written is not checked again).
	flush := func() error {
		if len(valid) == 0 {
			return nil
		}
		seen, vs := make([]*state.Connection, len(valid)), make([]state.Verdict, len(valid))
		for k, o := range valid {
			seen[k], vs[k] = o.v.c, o.verdict
		}
		sctx, cancel := storeCtx(ctx)
		chs, errs := w.store.ApplyVerdictsFrom(sctx, seen, vs)
		cancel()
		var first error
		for k, o := range valid {
			err := errs[k]
			switch {
			case o.v.dropped(err):
				err = nil
			case err != nil:
				err = storeErr("apply verdict", err)
				if first == nil {
					first = err
				}
				br.Waiting = append(br.Waiting, refs[o.i].String())
			default:
				w.metrics.transition(p.ServiceID, chs[k])
				o.mr.after(chs[k].After)
			}
			done(o.i, o.mr, err)
		}
		valid = valid[:0]
		return first
	}
	fail := func(err error) error {
		if ferr := flush(); ferr != nil && !errors.Is(err, errStoreUnavailable) {
			err = ferr
		}
		r.res.Outcome, r.res.Error = outcomeTransient, err.Error()
		return r.finish(ctx, err)
	}
	for i, m := range members {
		if err := ctx.Err(); err != nil {
			br.Waiting = append(br.Waiting, memberRefs(refs[i:])...)
			_ = flush()
			r.res.Outcome = taskCanceled
			return r.finish(ctx, err)
		}
		if err := read(i); err != nil {
			br.Waiting = append(br.Waiting, memberRefs(refs[i:])...)
			return fail(storeErr("read connections", err))
		}
		c, cerr := got[i%readChunk].Open()
		got[i%readChunk] = state.Got{} // the stored bytes are not needed any more
		if c != nil && settledSince(c, time.Unix(m.Due, 0)) {
			br.Outcomes[outcomeAlreadyChecked]++
			continue
		}
		mr := &taskRun{w: w, t: t, start: time.Now(), res: Result{Task: tasks.TypeValidate},
			taskID: r.taskID, queue: r.queue, consumerID: m.ConsumerID, connectionID: m.ConnectionID,
			integration: p.ServiceID}
		deferred := false
		v := &validation{w: w, r: mr, ref: refs[i], pre: &loaded{c: c, err: cerr},
			deferValid: func(v *validation, verdict state.Verdict) {
				deferred = true
				valid = append(valid, validOne{i: i, mr: mr, v: v, verdict: verdict})
			}}
		err := v.run(ctx)
		if deferred {
			if len(valid) >= maxDeferred || time.Since(valid[0].mr.start) >= maxDeferredAge {
				if err := flush(); err != nil {
					br.Waiting = append(br.Waiting, memberRefs(refs[i+1:])...)
					return fail(err)
				}
			}
			continue
		}
		err = mr.unreadable(err)
		done(i, mr, err)
		switch {
		case err == nil, errors.Is(err, asynq.SkipRetry):
			// A result, or one no retry can change (unreadable credentials).
			continue
		case errors.Is(err, errStoreUnavailable), ctx.Err() != nil,
			errors.Is(err, ErrCircuitOpen), errors.Is(err, ErrRateLimited):
			// Redis is away, or the integration holds every check back:
			// the rest would fare the same. Retry them all.
			br.Waiting = append(br.Waiting, memberRefs(refs[i:])...)
			return fail(err)
		}
		// This member's provider trouble: the others go on.
		br.Waiting = append(br.Waiting, refs[i].String())
		if failed == nil {
			failed = err
		}
		var ra *RetryAfterError
		if errors.As(err, &ra) {
			after = max(after, ra.After)
		}
	}
	if err := flush(); err != nil {
		return fail(err)
	}
	if failed != nil {
		r.res.Outcome = outcomeTransient
		r.res.Error = fmt.Sprintf("%d of %d members without a result: %s", len(br.Waiting), len(members), failed.Error())
		if after > 0 {
			r.res.RetryAfterMS = after.Milliseconds()
			failed = &RetryAfterError{After: after, Err: failed}
		}
		return r.finish(ctx, failed)
	}
	r.res.Outcome = outcomeChecked
	if len(br.Changed) > 0 {
		w.log.InfoContext(ctx, "batch changed connections", slog.String(keyTaskID, r.taskID),
			slog.String(keyIntegration, p.ServiceID), slog.Int("members", len(members)),
			slog.Int("changed", len(br.Changed)))
	}
	return r.finish(ctx, nil)
}

// settledSince reports whether c has a result from a check made at or
// after due: a verdict, a misconfigured account, or the start of a
// confirmation. Such a member of a retried batch is not checked again.
func settledSince(c *state.Connection, due time.Time) bool {
	switch {
	case c.Verdict != nil && c.Verdict.Revision == c.Revision && !c.Verdict.CheckedAt.Before(due):
		return true
	case c.Transient.Misconfigured && !c.Transient.LastAt.Before(due):
		return true
	case c.Confirmation.Invalids > 0 && c.Confirmation.Revision == c.Revision && !c.Confirmation.FirstAt.Before(due):
		return true
	}
	return false
}

func memberRefs(refs []state.Ref) []string {
	out := make([]string, len(refs))
	for i, r := range refs {
		out[i] = r.String()
	}
	return out
}
