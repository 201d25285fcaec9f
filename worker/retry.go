package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// ErrCircuitOpen means the integration's circuit breaker is open (or
// half-open with its probes taken): the task is put back for later without
// calling the provider and without using up a retry.
var ErrCircuitOpen = errors.New("worker: circuit breaker open")

// ErrRateLimited means the fleet-wide rate limit of the integration held
// the check back: the task is put back for later without using up a retry.
var ErrRateLimited = errors.New("worker: rate limited")

// ErrRefreshBusy means another worker holds the connection's refresh lock
// for longer than this task could wait.
var ErrRefreshBusy = errors.New("worker: token refresh in progress elsewhere")

// RetryAfterError asks for the task to be retried after a given delay (a
// provider's Retry-After, an open breaker's cool-down, a rate limit's next
// slot). Worker.RetryDelay honours it. It is retry.AfterError, the one
// type internal/events uses too.
type RetryAfterError = retry.AfterError

// isFailure tells asynq whether an error uses up a retry: tasks held back
// by the fleet itself (breaker, rate limit, another worker's refresh) do
// not.
func isFailure(err error) bool {
	return !errors.Is(err, ErrCircuitOpen) && !errors.Is(err, ErrRateLimited) && !errors.Is(err, ErrRefreshBusy) &&
		!errors.Is(err, errStoreUnavailable)
}

// storeRetryCeiling bounds the retry delay of a task that failed because
// Redis was unreachable: work a person asked for runs soon after the store
// returns, not after a provider's exponential backoff.
const storeRetryCeiling = 5 * time.Second

// RetryDelay is the worker's asynq RetryDelayFunc: the task type's own
// function from Config.RetryDelays if it has one; else a
// RetryAfterError's delay (capped by MaxRetryAfter); else, when Redis was
// unreachable, a delay of at most 5s; else exponential
// backoff with full jitter: uniform in [0, min(RetryMaxDelay,
// RetryBaseDelay*2^n)), at least one second.
func (w *Worker) RetryDelay(n int, err error, t *asynq.Task) time.Duration {
	if t != nil {
		if f := w.cfg.RetryDelays[t.Type()]; f != nil {
			return f(n, err, t)
		}
	}
	var ra *RetryAfterError
	if errors.As(err, &ra) && ra.After > 0 {
		return min(ra.After, w.cfg.MaxRetryAfter)
	}
	if errors.Is(err, errStoreUnavailable) {
		return backoff(n, time.Second, storeRetryCeiling)
	}
	return backoff(n, w.cfg.RetryBaseDelay, w.cfg.RetryMaxDelay)
}

// backoff is full jitter above one second: uniform in [1s, min(ceiling,
// base·2^n)).
func backoff(n int, base, ceiling time.Duration) time.Duration {
	return retry.Between(time.Second, retry.Exp(n, base, ceiling))
}

// jitter returns d plus up to half of d, to spread retries of many tasks.
func jitter(d time.Duration) time.Duration { return retry.Up(d, 0.5) }

// handleError is the server's ErrorHandler. The handlers of this package
// log their own task line, so their retries are logged here at debug level
// only; what asynq archives is an error, and the failures of Extra handlers
// are warnings, rate-limited so that a failure storm cannot flood the log.
func (w *Worker) handleError(ctx context.Context, t *asynq.Task, err error) {
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)
	archived := errors.Is(err, asynq.SkipRetry) || retried >= maxRetry
	level := slog.LevelDebug
	switch {
	case archived:
		level = slog.LevelError
	case t.Type() != tasks.TypeValidate && t.Type() != tasks.TypeRefreshToken && !errors.Is(err, context.Canceled):
		level = slog.LevelWarn
	}
	if level > slog.LevelDebug && !w.errLog.Allow() {
		level = slog.LevelDebug
	}
	if !w.log.Enabled(ctx, level) {
		return
	}
	id, _ := asynq.GetTaskID(ctx)
	queue, _ := asynq.GetQueueName(ctx)
	w.log.LogAttrs(context.WithoutCancel(ctx), level, "task failed",
		slog.String(keyTaskID, id), slog.String(keyTaskType, t.Type()), slog.String(keyQueue, queue),
		slog.Int("retried", retried), slog.Int("max_retry", maxRetry), slog.Bool("archived", archived),
		slog.String("error", err.Error()))
}

// safeErr describes err without anything secret: URLs are cut to
// scheme://host/path (a query may carry an API key), token endpoint
// answers to their status and error code (their body may echo input).
func safeErr(err error) string {
	if err == nil {
		return ""
	}
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		status := 0
		if re.Response != nil {
			status = re.Response.StatusCode
		}
		if re.ErrorCode != "" {
			return fmt.Sprintf("token endpoint answered %d %s", status, re.ErrorCode)
		}
		return fmt.Sprintf("token endpoint answered %d", status)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		inner := "request failed"
		switch {
		case ue.Timeout() || errors.Is(ue.Err, context.DeadlineExceeded):
			inner = "timeout"
		case errors.Is(ue.Err, context.Canceled):
			inner = "canceled"
		case ue.Err != nil:
			inner = safeErr(ue.Err)
		}
		return strings.ToLower(ue.Op) + " " + redact.URL(ue.URL) + ": " + inner
	}
	return err.Error()
}
