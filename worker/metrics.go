package worker

import (
	"context"
	"errors"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/state"
)

// Outcomes of vaultfleet_checks_total.
const (
	outcomeValid       = "valid"
	outcomeInvalid     = "invalid"
	outcomeTransient   = "transient"
	outcomeRateLimited = "rate_limited"
	outcomeSkipped     = "skipped"
	// outcomeMisconfigured: the consumer's own settings made the check
	// fail (no verdict, never provider trouble).
	outcomeMisconfigured = "misconfigured"
)

// outcomeHeld is the task result's outcome of an invalid verdict held back
// by the invalid-wave guard (the check counts as invalid in the metrics).
const outcomeHeld = "invalid_held"

// Outcomes of vaultfleet_token_refreshes_total.
const (
	refreshRefreshed = "refreshed"
	refreshRevoked   = "revoked"
	refreshTransient = "transient"
	refreshSkipped   = "skipped"
	refreshLostRace  = "lost_race"
	// refreshRotationLost: invalid_grant while an earlier exchange of the
	// same refresh token had an unknown outcome.
	refreshRotationLost = "rotation_lost"
	// refreshClientError: the provider rejected the fleet's own OAuth
	// client (invalid_client, unauthorized_client): no verdict.
	refreshClientError = "client_error"
	// refreshHeld: a revocation held back by the invalid-wave guard.
	refreshHeld = "revocation_held"
)

// Outcomes of vaultfleet_tasks_processed_total.
const (
	taskSuccess  = "success"
	taskRetry    = "retry"
	taskDeferred = "deferred"
	taskArchived = "archived"
	taskCanceled = "canceled"
)

// dropStale is the reason of vaultfleet_verdicts_dropped_total for a
// verdict whose credentials revision moved on.
const dropStale = "stale_revision"

// unknownLabel stands for a task type or integration the worker does not
// know, so that labels stay a small fixed set.
const unknownLabel = "unknown"

type metrics struct {
	checks         *prometheus.CounterVec
	checkDuration  *prometheus.HistogramVec
	transitions    *prometheus.CounterVec
	refreshes      *prometheus.CounterVec
	dropped        *prometheus.CounterVec
	held           *prometheus.CounterVec
	circuitOpen    *prometheus.GaugeVec
	tasksProcessed *prometheus.CounterVec
	taskDuration   *prometheus.HistogramVec
	rotationsLost  *prometheus.CounterVec
	clientErrors   *prometheus.CounterVec
	tokenWrites    *prometheus.CounterVec
}

// providerBuckets fit provider latencies: tens of milliseconds to a timeout.
var providerBuckets = []float64{.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_checks_total",
			Help: "Connection checks by integration and outcome (valid, invalid, transient, rate_limited, misconfigured, skipped).",
		}, []string{"integration", "outcome"}),
		checkDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vaultfleet_check_duration_seconds",
			Help:    "Duration of check requests sent to providers.",
			Buckets: providerBuckets,
		}, []string{"integration"}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_state_transitions_total",
			Help: "Connection state changes made by the worker.",
		}, []string{"integration", "from", "to"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_token_refreshes_total",
			Help: "Token refresh attempts by integration and outcome (refreshed, revoked, transient, skipped, lost_race, rotation_lost, client_error, revocation_held).",
		}, []string{"integration", "outcome"}),
		rotationsLost: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_token_rotations_lost_total",
			Help: "Refreshes answered invalid_grant while an earlier exchange of the same refresh token had an unknown outcome: a rotated token the fleet lost (never expected; alert).",
		}, []string{"integration"}),
		clientErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_oauth_client_errors_total",
			Help: "Token endpoint answers rejecting the fleet's own OAuth client (invalid_client, unauthorized_client): an integration incident, no connection is flipped.",
		}, []string{"integration"}),
		tokenWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_token_write_retries_total",
			Help: "Retried writes of refreshed tokens (Redis unavailable after the exchange), by outcome of the write (stored, failed).",
		}, []string{"outcome"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_verdicts_dropped_total",
			Help: "Verdicts not applied because the credentials changed while the check ran.",
		}, []string{"reason"}),
		held: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_invalid_verdicts_held_total",
			Help: "Invalid verdicts that would have turned a connection invalid, held back by the catalog's invalid-wave guard (retried later, state unchanged).",
		}, []string{"integration"}),
		circuitOpen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vaultfleet_circuit_open",
			Help: "1 while the integration's circuit breaker is open or half-open, 0 when closed.",
		}, []string{"integration"}),
		tasksProcessed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_tasks_processed_total",
			Help: "Tasks processed by queue, type and outcome (success, retry, deferred, archived, canceled).",
		}, []string{"queue", "task_type", "outcome"}),
		taskDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vaultfleet_task_duration_seconds",
			Help:    "Duration of task handlers.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"task_type"}),
	}
	for _, c := range []prometheus.Collector{m.checks, m.checkDuration, m.transitions, m.refreshes,
		m.dropped, m.held, m.circuitOpen, m.tasksProcessed, m.taskDuration, m.rotationsLost, m.clientErrors,
		m.tokenWrites} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	m.dropped.WithLabelValues(dropStale)
	return m, nil
}

// transition counts a state change, if the write made one.
func (m *metrics) transition(integration string, ch state.Change) {
	if ch.Before == nil || ch.After == nil || ch.Before.State == ch.After.State {
		return
	}
	m.transitions.WithLabelValues(integration, string(ch.Before.State), string(ch.After.State)).Inc()
}

// middleware counts and times every task, tracks handler goroutines so
// that Run can wait for them, and holds a failed task until Redis answers
// (awaitStore).
// known lists the registered task types (other types are labelled
// "unknown").
func (w *Worker) middleware(known map[string]bool) asynq.MiddlewareFunc {
	return func(next asynq.Handler) asynq.Handler {
		return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
			w.inflight.Add(1)
			defer w.inflight.Done()
			typ := t.Type()
			if !known[typ] {
				typ = unknownLabel
			}
			queue, ok := asynq.GetQueueName(ctx)
			if !ok {
				queue = unknownLabel
			}
			start := time.Now()
			err := next.ProcessTask(ctx, t)
			w.metrics.taskDuration.WithLabelValues(typ).Observe(time.Since(start).Seconds())
			w.metrics.tasksProcessed.WithLabelValues(queue, typ, taskOutcome(ctx, err)).Inc()
			if err != nil {
				// asynq writes the retry (or the archive) once this
				// returns: not into a Redis that is away (settle.go).
				w.awaitStore(ctx)
			}
			return err
		})
	}
}

func taskOutcome(ctx context.Context, err error) string {
	if err == nil {
		return taskSuccess
	}
	if ctx.Err() != nil {
		return taskCanceled
	}
	// asynq's order: revoked, archived (retries used up or SkipRetry),
	// else retried (deferred when the error is no failure).
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, ok := asynq.GetMaxRetry(ctx)
	if errors.Is(err, asynq.SkipRetry) || (ok && retried >= maxRetry) {
		return taskArchived
	}
	if !isFailure(err) {
		return taskDeferred
	}
	return taskRetry
}
