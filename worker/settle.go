package worker

import (
	"context"
	"log/slog"
	"time"
)

// A failed task is moved to its retry set by asynq after the handler
// returns. When that write fails because Redis is away (stopped, failing
// over), asynq v0.26 hands the write to its syncer with a context it has
// already cancelled (processor.retry's deferred cancel), so every later
// attempt fails as well: the task stays "active" until its 30 s lease
// lapses and the recoverer, which looks once a minute, finds it. Work that
// failed only because Redis blinked would wait up to 90 s, an on-demand
// validation included.
//
// awaitStore closes that gap from the fleet's side: a handler that fails
// waits, before it returns, until Redis answers a PING again, so asynq's
// own write of the retry succeeds at its first attempt. The wait is
// bounded by settleMax (below asynq's lease, past which asynq stops
// listening to the handler anyway), by the task's context and by the end
// of shutdown. A task that succeeds does not wait: if asynq cannot record
// its completion, the recoverer runs it once more later, which a check or
// a refresh of fresh tokens tolerates.
const (
	settleMax     = 20 * time.Second
	settlePing    = time.Second
	settlePause   = 250 * time.Millisecond
	settleMaxStep = 2 * time.Second
)

// awaitStore waits until Redis answers, for a handler that failed; see
// above. It reports how long it waited.
func (w *Worker) awaitStore(ctx context.Context) time.Duration {
	if ctx.Err() != nil {
		return 0
	}
	start := time.Now()
	step := settlePause
	for {
		pctx, cancel := context.WithTimeout(ctx, settlePing)
		err := w.rdb.Ping(pctx).Err()
		cancel()
		if err == nil {
			waited := time.Since(start)
			if waited > settlePing {
				w.log.Info("worker: Redis answers again; handing the task back to asynq",
					slog.Duration("waited", waited.Round(time.Millisecond)))
			}
			return waited
		}
		if time.Since(start) >= settleMax {
			w.log.Warn("worker: Redis still unreachable; asynq's recoverer will retry the task",
				slog.Duration("waited", time.Since(start).Round(time.Millisecond)))
			return time.Since(start)
		}
		t := time.NewTimer(step)
		select {
		case <-ctx.Done():
			t.Stop()
			return time.Since(start)
		case <-w.stopped:
			t.Stop()
			return time.Since(start)
		case <-t.C:
		}
		step = min(2*step, settleMaxStep)
	}
}
