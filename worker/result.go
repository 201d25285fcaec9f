package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Fixed log keys of every task line.
const (
	keyTaskID       = "task_id"
	keyTaskType     = "task_type"
	keyQueue        = "queue"
	keyConnectionID = "connection_id"
	keyConsumerID   = "consumer_id"
	keyIntegration  = "integration"
	keyVerdict      = "verdict"
	keyHTTPStatus   = "http_status"
)

// Result is the JSON each task writes through asynq's ResultWriter (the
// Asynq web monitor shows it). It never holds a secret.
type Result struct {
	// Task is the task type.
	Task string `json:"task"`
	// Outcome is valid, invalid, invalid_held, transient, rate_limited,
	// misconfigured or skipped for a validation; refreshed, revoked, transient, skipped or lost_race for a
	// refresh; malformed for a payload that cannot be read; canceled for a
	// task cut short by a shutdown (it goes back to its queue).
	Outcome string `json:"outcome"`
	// Verdict is the verdict computed (valid or invalid), if any.
	Verdict string `json:"verdict,omitempty"`
	// Reason is the verdict's reason.
	Reason     string `json:"reason,omitempty"`
	HTTPStatus int    `json:"http_status,omitempty"`
	// LatencyMS is the provider's latency (check or token request), zero
	// when no request was made.
	LatencyMS int64 `json:"latency_ms"`
	// DurationMS is how long the whole task took.
	DurationMS   int64  `json:"duration_ms"`
	StateBefore  string `json:"state_before,omitempty"`
	StateAfter   string `json:"state_after,omitempty"`
	HealthBefore string `json:"health_before,omitempty"`
	HealthAfter  string `json:"health_after,omitempty"`
	// Skipped says why nothing was done (not_found, disabled, ...).
	Skipped string `json:"skipped,omitempty"`
	// Dropped says why a verdict was not applied (stale_revision).
	Dropped string `json:"dropped,omitempty"`
	// TokenRefresh is the outcome of a refresh made during a validation.
	TokenRefresh string `json:"token_refresh,omitempty"`
	// Error describes a transient failure.
	Error string `json:"error,omitempty"`
	// RetryAfterMS is the delay the task asked for before its retry.
	RetryAfterMS int64 `json:"retry_after_ms,omitempty"`
	// Batch sums up a connection:validate_batch, member by member.
	Batch *BatchResult `json:"batch,omitempty"`
	At    time.Time    `json:"at"`
}

// Skip reasons.
const (
	skipNotFound       = "not_found"
	skipDisabled       = "disabled"
	skipUnknownService = "unknown_integration"
	skipNotCheckable   = "connector_not_checkable"
	skipNothingToCheck = "nothing_to_check"
	skipNotOAuth       = "not_oauth"
	skipNoRefreshToken = "no_refresh_token"
	skipNotDue         = "not_due"
	skipCircuitOpen    = "circuit_open"
	skipRevoked        = "refresh_token_revoked"
)

// taskRun collects what one task did, for its result and its log line.
type taskRun struct {
	w     *Worker
	t     *asynq.Task
	start time.Time
	res   Result
	// identity for the log line
	taskID, queue, consumerID, connectionID, integration string
}

// connectionRun starts the run of a task about one connection and reads
// its payload. A malformed payload is an error to pass to r.finish: the
// task is archived at once, its result saying "malformed".
func (w *Worker) connectionRun(ctx context.Context, t *asynq.Task) (*taskRun, state.Ref, error) {
	r := w.newRun(ctx, t)
	p, err := tasks.ParseConnectionPayload(t.Payload())
	if err != nil {
		r.res.Outcome, r.res.Error = "malformed", err.Error()
		return r, state.Ref{}, fmt.Errorf("worker: %s: %w: %w", t.Type(), err, asynq.SkipRetry)
	}
	ref := state.Ref{ConsumerID: p.ConsumerID, ConnectionID: p.ConnectionID}
	r.consumerID, r.connectionID = ref.ConsumerID, ref.ConnectionID
	return r, ref, nil
}

func (w *Worker) newRun(ctx context.Context, t *asynq.Task) *taskRun {
	r := &taskRun{w: w, t: t, start: time.Now(), res: Result{Task: t.Type()}}
	r.taskID, _ = asynq.GetTaskID(ctx)
	r.queue, _ = asynq.GetQueueName(ctx)
	return r
}

// before notes the connection's state and health before the task.
func (r *taskRun) before(c *state.Connection) {
	if c == nil {
		return
	}
	r.res.StateBefore, r.res.HealthBefore = string(c.State), string(c.Health)
	r.res.StateAfter, r.res.HealthAfter = string(c.State), string(c.Health)
}

// after notes the state and health a write left.
func (r *taskRun) after(c *state.Connection) {
	if c == nil {
		return
	}
	r.res.StateAfter, r.res.HealthAfter = string(c.State), string(c.Health)
}

// finish writes the result and the task line and returns err.
func (r *taskRun) finish(ctx context.Context, err error) error {
	err = r.unreadable(err)
	r.res.At = r.w.now().UTC()
	r.res.DurationMS = time.Since(r.start).Milliseconds()
	if rw := r.t.ResultWriter(); rw != nil {
		if b, merr := json.Marshal(r.res); merr == nil {
			// The task's context may be cancelled (shutdown); the result
			// is best effort.
			_, _ = rw.Write(b)
		}
	}
	r.log(ctx, err, false)
	return err
}

// unreadable marks a run that met credentials sealed with a retired key:
// they never open on a retry, so the task (or batch member) is skipped and
// not retried, and its result says why (the error names the key id, never
// a secret), whichever handler met it. Other errors pass unchanged.
func (r *taskRun) unreadable(err error) error {
	if !errors.Is(err, state.ErrUnreadable) {
		return err
	}
	r.res.Outcome, r.res.Skipped, r.res.Error = outcomeSkipped, skipUnreadable, err.Error()
	if !errors.Is(err, asynq.SkipRetry) {
		err = fmt.Errorf("%w: %w", err, asynq.SkipRetry)
	}
	return err
}

// log writes the task line: info for what a task found out; debug for
// no-ops and tasks put back by the fleet itself, and, when quiet, for a
// check that changed nothing (a batch member). Transient failures are
// info too: a provider outage makes thousands of them (the metrics and
// the breaker say it).
func (r *taskRun) log(ctx context.Context, err error, quiet bool) {
	level := slog.LevelInfo
	if r.res.Outcome == outcomeSkipped || r.res.Outcome == refreshLostRace || (err != nil && !isFailure(err)) {
		level = slog.LevelDebug
	}
	if quiet && err == nil && r.res.StateBefore == r.res.StateAfter && r.res.HealthBefore == r.res.HealthAfter &&
		r.res.Outcome == outcomeValid {
		level = slog.LevelDebug
	}
	if r.res.Skipped == skipUnreadable {
		level = slog.LevelWarn // an operator must act: the key is gone
	}
	if !r.w.log.Enabled(ctx, level) {
		return
	}
	attrs := make([]slog.Attr, 0, 16)
	attrs = append(attrs,
		slog.String(keyTaskID, r.taskID), slog.String(keyTaskType, r.t.Type()), slog.String(keyQueue, r.queue),
		slog.String(keyConsumerID, r.consumerID), slog.String(keyConnectionID, r.connectionID),
		slog.String(keyIntegration, r.integration), slog.String(keyVerdict, r.res.Verdict),
		slog.Int(keyHTTPStatus, r.res.HTTPStatus), slog.String("outcome", r.res.Outcome),
		slog.Int64("latency_ms", r.res.LatencyMS), slog.Int64("duration_ms", r.res.DurationMS))
	if r.res.Reason != "" {
		attrs = append(attrs, slog.String("reason", r.res.Reason))
	}
	if r.res.StateBefore != r.res.StateAfter || r.res.StateBefore != "" {
		attrs = append(attrs, slog.String("state_before", r.res.StateBefore), slog.String("state_after", r.res.StateAfter))
	}
	for _, kv := range [][2]string{{"skipped", r.res.Skipped}, {"dropped", r.res.Dropped},
		{"token_refresh", r.res.TokenRefresh}, {"error", r.res.Error}} {
		if kv[1] != "" {
			attrs = append(attrs, slog.String(kv[0], kv[1]))
		}
	}
	msg := "task done"
	if r.t.Type() != r.res.Task {
		msg = "batch member done"
	}
	r.w.log.LogAttrs(context.WithoutCancel(ctx), level, msg, attrs...)
}

// asynqLogger adapts a *slog.Logger to asynq's Logger interface.
type asynqLogger struct{ l *slog.Logger }

func newAsynqLogger(l *slog.Logger) asynq.Logger {
	return asynqLogger{l: l.With(slog.String("component", "asynq"))}
}

func (a asynqLogger) Debug(args ...any) { a.l.Debug(fmt.Sprint(args...)) }
func (a asynqLogger) Info(args ...any)  { a.l.Info(fmt.Sprint(args...)) }
func (a asynqLogger) Warn(args ...any)  { a.l.Warn(fmt.Sprint(args...)) }
func (a asynqLogger) Error(args ...any) { a.l.Error(fmt.Sprint(args...)) }

// Fatal logs and exits, as asynq's Logger contract says.
func (a asynqLogger) Fatal(args ...any) {
	a.l.Error(fmt.Sprint(args...))
	os.Exit(1)
}
