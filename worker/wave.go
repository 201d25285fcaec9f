package worker

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// waveScript is the invalid-wave guard's sliding window: the flips to
// invalid let through for one integration within the window, one member
// per connection revision, scored by the time (ms) it was let through.
// KEYS[1] the window's sorted set; ARGV[1] now (ms), ARGV[2] the window
// (ms), ARGV[3] the threshold, ARGV[4] the member. It returns {1, count,
// 0} when the flip may go ahead (and counts it), {0, count, oldest} when
// the window is full: oldest is when the oldest flip in it was let
// through. A member already in the window (a retry after a failed write)
// goes ahead without counting twice.
var waveScript = redis.NewScript(`
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return {1, n, 0} end
if n >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, n, tonumber(oldest[2])}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {1, n + 1, 0}
`)

// guardFlip is the invalid-wave guard (catalog invalid_wave), the one
// place every verdict about to turn a connection invalid passes through:
// checks and token refreshes (invalid_grant) alike. Call it with the
// connection as read (c), the integration, the verdict about to be
// applied with ApplyVerdictFrom, and the verdict's time.
//
// Only a flip counts: a verdict for which state.WouldInvalidate(c, in, v,
// now) holds, i.e. c is not invalid already and the verdict would make it
// invalid after the integration's confirmation (a confirmation step that
// does not flip yet does not count). A verdict without an HTTP status was
// reached without any provider answer (a request the connection's own
// settings make impossible): it says nothing about the provider and never
// counts. Neither is ever held.
//
// At most Threshold flips per integration go ahead within any sliding
// Window, fleet wide (one count per connection revision). A further flip
// is held: the caller must not apply v, must keep the state (recording a
// transient failure is fine: c is not invalid, so no invalid connection
// ever gets a downstream.degraded event from a held verdict) and should
// retry after retryAfter, when the oldest flip of the window has left it
// (plus jitter, so held retries do not all come back at once). A held
// verdict is counted in vaultfleet_invalid_verdicts_held_total and
// logged. Without a guard in the catalog, or when Redis cannot be asked,
// nothing is held: the guard must not turn a Redis hiccup into a stuck
// verdict.
func (w *Worker) guardFlip(ctx context.Context, in *catalog.Integration, c *state.Connection, v state.Verdict, now time.Time) (held bool, retryAfter time.Duration) {
	g := in.InvalidWave
	if g == nil || g.Threshold < 1 || v.HTTPStatus == 0 || !state.WouldInvalidate(c, in, v, now) {
		return false, 0
	}
	window := g.Window.D()
	if window <= 0 {
		window = catalog.DefaultInvalidWaveWindow
	}
	rev := v.Revision
	if rev == 0 {
		rev = c.Revision
	}
	key := w.cfg.KeyPrefix + ":wave:" + in.ID
	member := c.Ref().String() + "|" + strconv.FormatInt(rev, 10)
	res, err := waveScript.Run(ctx, w.cfg.Redis, []string{key},
		now.UnixMilli(), window.Milliseconds(), g.Threshold, member).Int64Slice()
	if err != nil || len(res) != 3 {
		msg := "malformed reply"
		if err != nil {
			msg = err.Error()
		}
		w.log.WarnContext(ctx, "invalid-wave guard unavailable", slog.String(keyIntegration, in.ID),
			slog.String("error", msg))
		return false, 0
	}
	if res[0] == 1 {
		return false, 0
	}
	retryAfter = time.UnixMilli(res[2]).Add(window).Sub(now)
	retryAfter = max(retryAfter, time.Second) + rand.N(window/10+1)
	w.metrics.held.WithLabelValues(in.ID).Inc()
	w.log.WarnContext(ctx, "invalid verdict held back: wave of invalid verdicts",
		slog.String(keyIntegration, in.ID), slog.Int64("flips_in_window", res[1]),
		slog.Int("threshold", g.Threshold), slog.Duration("window", window),
		slog.String("reason", v.Reason), slog.Duration("retry_after", retryAfter))
	return true, retryAfter
}

// heldMessage says why a verdict was held (no secret: counts and ids only).
func heldMessage(in *catalog.Integration) string {
	return fmt.Sprintf("invalid verdict held: %d connections of %s turned invalid within %s (invalid_wave threshold)",
		in.InvalidWave.Threshold, in.ID, in.InvalidWave.Window.D())
}
