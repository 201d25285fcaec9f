// Package retry holds the fleet's one implementation of retry delays:
// exponential growth with a ceiling, the jitter that spreads retries of
// many tasks or replicas, a context-aware sleep, the error that asks for a
// given delay, and the reading of an HTTP Retry-After header.
//
// Every function is pure apart from the random source it is given (or
// math/rand/v2 where it takes none), so callers keep their own policy
// (base, ceiling, spread) and share the arithmetic.
package retry

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Exp returns base doubled n times, capped at ceiling; base for n <= 0
// (still capped). It never overflows.
func Exp(n int, base, ceiling time.Duration) time.Duration {
	d := base
	for i := 0; i < n && d < ceiling; i++ {
		if d > ceiling/2 {
			d = ceiling
			break
		}
		d *= 2
	}
	return min(d, ceiling)
}

// Spread scales d by a factor uniform in [1-f, 1+f] for u uniform in
// [0, 1): callers pass rand.Float64() or a test's fixed value.
func Spread(d time.Duration, f, u float64) time.Duration {
	if f == 0 || d <= 0 {
		return d
	}
	return time.Duration(float64(d) * (1 + f*(2*u-1)))
}

// Between returns a duration uniform in [lo, hi), or lo when hi <= lo: full
// jitter above a floor.
func Between(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + rand.N(hi-lo)
}

// Up returns d plus up to f·d (uniform): a delay that is never shorter
// than asked for, spread so that many retries do not come back together.
func Up(d time.Duration, f float64) time.Duration {
	if d <= 0 {
		return 0
	}
	return d + rand.N(time.Duration(float64(d)*f)+1)
}

// Sleep waits d or until ctx is done, whichever comes first; it returns
// ctx.Err() in the second case.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// AfterError asks for the task to be retried after a given delay (a
// provider's or webhook receiver's Retry-After, an open breaker's
// cool-down, a rate limit's next slot). The RetryDelayFuncs of the worker
// and of internal/events honour it.
type AfterError struct {
	// After is the delay before the retry.
	After time.Duration
	// Err says why.
	Err error
}

func (e *AfterError) Error() string {
	return fmt.Sprintf("%v (retry after %s)", e.Err, e.After.Round(time.Millisecond))
}

func (e *AfterError) Unwrap() error { return e.Err }

// maxHeaderAfter bounds what a Retry-After header can ask for, so that a
// huge delay-seconds value cannot overflow a Duration.
const maxHeaderAfter = 365 * 24 * time.Hour

// ParseAfter reads the value of a Retry-After header (RFC 9110 §10.2.3):
// delay-seconds or an HTTP date. ok is false when v is empty or neither;
// a date in the past gives (0, true). The delay is at most a year; callers
// apply their own, smaller cap.
func ParseAfter(v string, now time.Time) (d time.Duration, ok bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil {
		if s < 0 {
			return 0, false
		}
		return min(time.Duration(min(s, int64(maxHeaderAfter/time.Second)))*time.Second, maxHeaderAfter), true
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(t.Sub(now), 0), maxHeaderAfter), true
	}
	return 0, false
}

// HeaderAfter is ParseAfter on h's Retry-After, zero when absent or
// unreadable.
func HeaderAfter(h http.Header, now time.Time) time.Duration {
	d, _ := ParseAfter(h.Get("Retry-After"), now)
	return d
}
