package state

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

// The fleet-wide counters of the worker live here, with the store's other
// scripts and key names, so that no package but state speaks Redis for
// the fleet's own data. Their keys are one per integration, outside the
// shards' hash tags (each is used alone, so any slot will do):
//
//	<prefix>:ratelimit:<integration>   GCRA state of redis_rate ("rate:" in front)
//	<prefix>:wave:<integration>        zset: flips to invalid let through, by ms

// RateLimiter paces requests fleet wide, one limit per name (an
// integration id): GCRA (go-redis/redis_rate) with burst 1, so no window
// of the period's length ever holds more than the limit. Safe for
// concurrent use.
type RateLimiter struct {
	lim    *redis_rate.Limiter
	prefix string
}

// NewRateLimiter returns the rate limiter whose keys start with prefix
// (DefaultPrefix if empty).
func NewRateLimiter(client redis.UniversalClient, prefix string) *RateLimiter {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &RateLimiter{lim: redis_rate.NewLimiter(client), prefix: prefix}
}

// Take takes one slot of name's limit of n requests per period. When none
// is free it returns ok false and how long until the next one.
func (l *RateLimiter) Take(ctx context.Context, name string, n int, period time.Duration) (ok bool, retryAfter time.Duration, err error) {
	if n <= 0 || period <= 0 {
		return false, 0, &FieldError{Field: "rate limit", Msg: fmt.Sprintf("%d per %s: needs a positive count and period", n, period)}
	}
	res, err := l.lim.Allow(ctx, l.key(name), redis_rate.Limit{Rate: n, Burst: 1, Period: period})
	if err != nil {
		return false, 0, fmt.Errorf("state: rate limit of %s: %w", name, err)
	}
	if res.Allowed > 0 {
		return true, 0, nil
	}
	return false, res.RetryAfter, nil
}

func (l *RateLimiter) key(name string) string { return l.prefix + ":ratelimit:" + name }

//go:embed lua/wave.lua
var waveLua string

var waveScript = redis.NewScript(waveLua)

// WaveCounter keeps one sliding window of admitted members per name (an
// integration id), fleet wide: the invalid-wave guard's count of
// connections turned invalid. Safe for concurrent use.
type WaveCounter struct {
	client redis.UniversalClient
	prefix string
}

// NewWaveCounter returns the counter whose keys start with prefix
// (DefaultPrefix if empty).
func NewWaveCounter(client redis.UniversalClient, prefix string) *WaveCounter {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &WaveCounter{client: client, prefix: prefix}
}

// WaveAdmission is the answer of WaveCounter.Admit.
type WaveAdmission struct {
	// Admitted: the member was counted (or was in the window already).
	Admitted bool
	// InWindow is how many members the window holds, this one included
	// when admitted.
	InWindow int64
	// Oldest, when not admitted, is when the oldest member of the full
	// window was admitted: a slot frees at Oldest plus the window.
	Oldest time.Time
}

// Admit counts member in name's window of the given length at now, unless
// it already holds threshold members. A member already in the window is
// admitted again without counting twice.
func (w *WaveCounter) Admit(ctx context.Context, name, member string, now time.Time, window time.Duration, threshold int) (WaveAdmission, error) {
	if window <= 0 || threshold < 1 {
		return WaveAdmission{}, &FieldError{Field: "wave", Msg: fmt.Sprintf("threshold %d within %s: needs a positive threshold and window", threshold, window)}
	}
	res, err := waveScript.Run(ctx, w.client, []string{w.key(name)},
		now.UnixMilli(), window.Milliseconds(), threshold, member).Int64Slice()
	if err != nil {
		return WaveAdmission{}, fmt.Errorf("state: wave window of %s: %w", name, err)
	}
	if len(res) != 3 {
		return WaveAdmission{}, fmt.Errorf("state: wave window of %s: %w", name, errMalformedReply)
	}
	a := WaveAdmission{Admitted: res[0] == 1, InWindow: res[1]}
	if !a.Admitted {
		a.Oldest = time.UnixMilli(res[2])
	}
	return a, nil
}

func (w *WaveCounter) key(name string) string { return w.prefix + ":wave:" + name }

var errMalformedReply = errors.New("malformed reply")
