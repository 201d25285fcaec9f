package scheduler

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/vaultfleet/vaultfleet/state"
)

// untriedClaims collects the claims a sweep took but never tried to
// enqueue (it gave up after consecutive enqueue failures).
type untriedClaims struct {
	mu   sync.Mutex
	jobs []job
}

func (u *untriedClaims) add(j job) {
	u.mu.Lock()
	u.jobs = append(u.jobs, j)
	u.mu.Unlock()
}

func (u *untriedClaims) take() []job {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := u.jobs
	u.jobs = nil
	return out
}

// giveBack puts untried claims back at the due time they were claimed at,
// each only if it still carries its claim's lease score (a write or
// another replica since the claim wins). It is best effort: a claim that
// cannot be given back (Redis down) is due again after its lease.
func (s *Scheduler) giveBack(ctx context.Context, js []job) {
	if len(js) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), drainTimeout)
	defer cancel()
	byIdx := map[state.Index][]state.Claim{}
	for _, j := range js {
		if j.batch != nil {
			byIdx[j.idx] = append(byIdx[j.idx], j.batch...)
			continue
		}
		byIdx[j.idx] = append(byIdx[j.idx], j.claim)
	}
	for idx, claims := range byIdx {
		err := s.rollback(ctx, idx, claims)
		if err != nil && s.rescheduleLog.Allow() {
			s.cfg.Logger.WarnContext(ctx, "scheduler: cannot give back untried claims; they are due again after their lease",
				slog.String("index", string(idx)), slog.Int("claims", len(claims)), slog.String("error", err.Error()))
		}
	}
}

// rollback reschedules claims to their own due times.
func (s *Scheduler) rollback(ctx context.Context, idx state.Index, claims []state.Claim) error {
	br, batches := s.cfg.Store.(BatchRescheduler)
	for len(claims) > 0 {
		n := min(len(claims), rescheduleBatch)
		part := claims[:n]
		claims = claims[n:]
		if batches {
			due := make([]time.Time, len(part))
			for i, c := range part {
				due[i] = c.Due
			}
			if _, err := br.RescheduleBatch(ctx, idx, part, due); err != nil {
				return err
			}
			continue
		}
		for _, c := range part {
			if _, err := s.cfg.Store.RescheduleClaim(ctx, idx, c, c.Due); err != nil &&
				!errors.Is(err, state.ErrStale) && !errors.Is(err, state.ErrNotFound) {
				return err
			}
		}
	}
	return nil
}

// RefusedShardsError is what Sweep returns when its only failures were
// shards whose claims Redis refused with an error reply (a slot migrating
// on Redis Cluster, say): every other shard was swept. Run does not back
// off for it.
type RefusedShardsError struct{ errs []error }

func (e *RefusedShardsError) Error() string   { return errors.Join(e.errs...).Error() }
func (e *RefusedShardsError) Unwrap() []error { return e.errs }

// refusedOnly reports whether every error is an error reply.
func refusedOnly(errs []error) bool {
	for _, err := range errs {
		if !state.ReplyError(err) {
			return false
		}
	}
	return true
}
