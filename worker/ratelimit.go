package worker

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/go-redis/redis_rate/v10"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
)

// rateLimit returns the fleet-wide limit of an integration, if it has one:
// the catalog's requests per period, paced evenly (burst 1, so no window of
// the period's length ever holds more than the limit) and stretched by the
// configured headroom.
func (w *Worker) rateLimit(in *catalog.Integration) (redis_rate.Limit, bool) {
	rl := in.RateLimit
	if rl.Requests <= 0 || rl.Per.D() <= 0 {
		return redis_rate.Limit{}, false
	}
	period := time.Duration(float64(rl.Per.D()) * (1 + w.cfg.RateLimitHeadroom))
	return redis_rate.Limit{Rate: rl.Requests, Burst: 1, Period: period}, true
}

func (w *Worker) rateKey(in *catalog.Integration) string {
	return w.cfg.KeyPrefix + ":ratelimit:" + in.ID
}

// waitRateLimit takes one slot of the integration's fleet-wide rate limit,
// waiting up to RateLimitWait for it. When none comes in time it returns a
// RetryAfterError wrapping ErrRateLimited with the delay until the next
// slot.
func (w *Worker) waitRateLimit(ctx context.Context, in *catalog.Integration) error {
	limit, ok := w.rateLimit(in)
	if !ok {
		return nil
	}
	key := w.rateKey(in)
	deadline := time.Now().Add(w.cfg.RateLimitWait)
	for {
		res, err := w.limiter.Allow(ctx, key, limit)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("worker: rate limit of %s: %w", in.ID, err)
		}
		if res.Allowed > 0 {
			return nil
		}
		wait := max(res.RetryAfter, time.Millisecond)
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
