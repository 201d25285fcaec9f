package worker

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// waveCounter keeps the invalid-wave guard's sliding windows, one per
// integration id, fleet wide; *state.WaveCounter is one.
type waveCounter interface {
	// Admit counts member in name's window at now unless the window holds
	// threshold members already (a member already in it goes ahead
	// without counting twice).
	Admit(ctx context.Context, name, member string, now time.Time, window time.Duration, threshold int) (state.WaveAdmission, error)
}

var _ waveCounter = (*state.WaveCounter)(nil)

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
	member := c.Ref().String() + "|" + strconv.FormatInt(rev, 10)
	res, err := w.waves.Admit(ctx, in.ID, member, now, window, g.Threshold)
	if err != nil {
		w.log.WarnContext(ctx, "invalid-wave guard unavailable", slog.String(keyIntegration, in.ID),
			slog.String("error", err.Error()))
		return false, 0
	}
	if res.Admitted {
		return false, 0
	}
	retryAfter = res.Oldest.Add(window).Sub(now)
	retryAfter = max(retryAfter, time.Second) + rand.N(window/10+1)
	w.metrics.held.WithLabelValues(in.ID).Inc()
	w.log.WarnContext(ctx, "invalid verdict held back: wave of invalid verdicts",
		slog.String(keyIntegration, in.ID), slog.Int64("flips_in_window", res.InWindow),
		slog.Int("threshold", g.Threshold), slog.Duration("window", window),
		slog.String("reason", v.Reason), slog.Duration("retry_after", retryAfter))
	return true, retryAfter
}

// heldMessage says why a verdict was held (no secret: counts and ids only).
func heldMessage(in *catalog.Integration) string {
	return fmt.Sprintf("invalid verdict held: %d connections of %s turned invalid within %s (invalid_wave threshold)",
		in.InvalidWave.Threshold, in.ID, in.InvalidWave.Window.D())
}
