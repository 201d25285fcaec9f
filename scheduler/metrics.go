package scheduler

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/state"
)

// metrics are the scheduler's Prometheus collectors. Labels come from
// small fixed sets: task (validate, refresh_token) and index (check,
// refresh).
type metrics struct {
	enqueued     *prometheus.CounterVec
	batched      prometheus.Counter
	sweep        *prometheus.HistogramVec
	lag          *prometheus.GaugeVec
	claims       *prometheus.CounterVec
	errors       *prometheus.CounterVec
	backpressure prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		enqueued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_scheduler_enqueued_total",
			Help: "Tasks the scheduler enqueued, by task (validate, validate_batch, refresh_token); task id conflicts (already queued) are not counted.",
		}, []string{"task"}),
		batched: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vaultfleet_scheduler_batched_checks_total",
			Help: "Periodic checks the scheduler enqueued inside connection:validate_batch tasks.",
		}),
		sweep: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vaultfleet_scheduler_sweep_duration_seconds",
			Help:    "Time from the start of a sweep until every claim of the index was enqueued.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300},
		}, []string{"index"}),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vaultfleet_scheduler_lag_seconds",
			Help: "Now minus the oldest due time still unclaimed at the start of the latest sweep (0 when nothing is overdue).",
		}, []string{"index"}),
		claims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_scheduler_claims_total",
			Help: "Due members claimed from the index.",
		}, []string{"index"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_scheduler_enqueue_errors_total",
			Help: "Claims whose task could not be enqueued (they come back after their lease).",
		}, []string{"index"}),
		backpressure: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vaultfleet_scheduler_backpressure",
			Help: "1 while periodic check sweeps are paused because the low queue is full.",
		}),
	}
	for _, t := range []string{"validate", "validate_batch", "refresh_token"} {
		m.enqueued.WithLabelValues(t)
	}
	for _, idx := range []state.Index{state.IndexCheck, state.IndexRefresh} {
		m.sweep.WithLabelValues(string(idx))
		m.lag.WithLabelValues(string(idx))
		m.claims.WithLabelValues(string(idx))
		m.errors.WithLabelValues(string(idx))
	}
	if reg == nil {
		return m, nil
	}
	var err error
	m.enqueued, err = register(reg, m.enqueued)
	if err == nil {
		m.sweep, err = register(reg, m.sweep)
	}
	if err == nil {
		m.lag, err = register(reg, m.lag)
	}
	if err == nil {
		m.claims, err = register(reg, m.claims)
	}
	if err == nil {
		m.errors, err = register(reg, m.errors)
	}
	if err == nil {
		m.backpressure, err = register(reg, m.backpressure)
	}
	if err == nil {
		m.batched, err = register(reg, m.batched)
	}
	if err != nil {
		return nil, err
	}
	return m, nil
}

// register registers c, or returns the collector already registered under
// the same description (a second Scheduler on the same Registerer).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, err
}
