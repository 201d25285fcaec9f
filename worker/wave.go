package worker

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// waveScript counts one invalid verdict in the current window of an
// integration and returns the count. KEYS[1] the window's counter; ARGV[1]
// its expiry in ms.
var waveScript = redis.NewScript(`
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
`)

// holdInvalid counts an invalid verdict for the integration's invalid-wave
// guard (catalog invalid_wave) and reports whether it must be held back:
// more than Threshold invalid verdicts arrived fleet wide in the current
// window. Without a guard, or when Redis cannot be asked, nothing is held
// (the guard must not turn a Redis hiccup into a stuck verdict).
func (w *Worker) holdInvalid(ctx context.Context, in *catalog.Integration, now time.Time) (held bool, count int64, window time.Duration) {
	g := in.InvalidWave
	if g == nil || g.Threshold < 1 {
		return false, 0, 0
	}
	window = g.Window.D()
	if window <= 0 {
		window = catalog.DefaultInvalidWaveWindow
	}
	bucket := now.UnixMilli() / window.Milliseconds()
	key := w.cfg.KeyPrefix + ":wave:" + in.ID + ":" + strconv.FormatInt(bucket, 10)
	n, err := waveScript.Run(ctx, w.cfg.Redis, []string{key}, (2 * window).Milliseconds()).Int64()
	if err != nil {
		w.log.WarnContext(ctx, "invalid-wave guard unavailable", slog.String(keyIntegration, in.ID),
			slog.String("error", err.Error()))
		return false, 0, window
	}
	return n > int64(g.Threshold), n, window
}

// heldMessage says why a verdict was held (no secret: counts and ids only).
func heldMessage(in *catalog.Integration, n int64, window time.Duration) string {
	return fmt.Sprintf("invalid verdict held: %d invalid verdicts for %s within %s (threshold %d)",
		n, in.ID, window, in.InvalidWave.Threshold)
}
