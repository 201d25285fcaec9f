package worker

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
)

// rateLimiter takes slots of fleet-wide rate limits, one limit per
// integration id; *state.RateLimiter is one.
type rateLimiter interface {
	// Take takes one slot of name's limit of n requests per period, or
	// says how long until the next one.
	Take(ctx context.Context, name string, n int, period time.Duration) (ok bool, retryAfter time.Duration, err error)
}

var _ rateLimiter = (*state.RateLimiter)(nil)

// rateLimit returns the fleet-wide limit of an integration, if it has one:
// the catalog's requests per period, stretched by the configured headroom
// (the limiter paces them evenly).
func (w *Worker) rateLimit(in *catalog.Integration) (n int, period time.Duration, ok bool) {
	rl := in.RateLimit
	if rl.Requests <= 0 || rl.Per.D() <= 0 {
		return 0, 0, false
	}
	return rl.Requests, time.Duration(float64(rl.Per.D()) * (1 + w.cfg.RateLimitHeadroom)), true
}

// waitRateLimit takes one slot of the integration's fleet-wide rate limit,
// waiting up to RateLimitWait for it. When none comes in time it returns a
// RetryAfterError wrapping ErrRateLimited with the delay until the next
// slot.
func (w *Worker) waitRateLimit(ctx context.Context, in *catalog.Integration) error {
	n, period, ok := w.rateLimit(in)
	if !ok {
		return nil
	}
	deadline := time.Now().Add(w.cfg.RateLimitWait)
	for {
		allowed, retryAfter, err := w.limiter.Take(ctx, in.ID, n, period)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("worker: %w", err)
		}
		if allowed {
			return nil
		}
		wait := max(retryAfter, time.Millisecond)
		if time.Until(deadline) < wait {
			return &RetryAfterError{After: jitter(max(wait, time.Second)), Err: ErrRateLimited}
		}
		// A little jitter keeps the waiters of one slot from asking Redis
		// all at the same instant.
		if err := retry.Sleep(ctx, wait+rand.N(2*time.Millisecond)); err != nil {
			return err
		}
	}
}
