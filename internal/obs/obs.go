// Package obs holds the collectors that read fleet-wide numbers from Redis
// at scrape time: connections per integration and state (from the store's
// counters, never a SCAN) and asynq's queue metrics. Export them from one
// process (serve, or dev), not from every worker.
package obs

import (
	"context"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
	"github.com/hibiken/asynq/x/metrics"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// Counter is the store method the connections collector reads.
type Counter interface {
	Counts(ctx context.Context) (map[state.CountKey]int64, error)
}

// ConnectionsCollector exports vaultfleet_connections{integration,state}.
type ConnectionsCollector struct {
	store   Counter
	cat     *catalog.Catalog
	timeout time.Duration
	logger  *slog.Logger
	desc    *prometheus.Desc
	errDesc *prometheus.Desc
}

// NewConnectionsCollector returns a collector over the store's counters.
// Every catalog integration and stored state is exported, zeros included,
// so dashboards see a series for each.
func NewConnectionsCollector(store Counter, cat *catalog.Catalog, logger *slog.Logger) *ConnectionsCollector {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &ConnectionsCollector{
		store: store, cat: cat, timeout: 5 * time.Second, logger: logger,
		desc: prometheus.NewDesc("vaultfleet_connections",
			"Stored connections per integration and state, from the store's counters.",
			[]string{"integration", "state"}, nil),
		errDesc: prometheus.NewDesc("vaultfleet_connections_scrape_error",
			"1 if reading the connection counters failed during this scrape.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *ConnectionsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.desc
	ch <- c.errDesc
}

// Collect implements prometheus.Collector.
func (c *ConnectionsCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	counts, err := c.store.Counts(ctx)
	if err != nil {
		c.logger.Warn("connections collector", slog.String("error", err.Error()))
		ch <- prometheus.MustNewConstMetric(c.errDesc, prometheus.GaugeValue, 1)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.errDesc, prometheus.GaugeValue, 0)
	seen := map[state.CountKey]bool{}
	for _, in := range c.cat.Integrations {
		for _, s := range state.States {
			if s == state.Available {
				continue // never stored: it is the absence of a record
			}
			k := state.CountKey{ServiceID: in.ID, State: s}
			seen[k] = true
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[k]), in.ID, string(s))
		}
	}
	// Connections of integrations that left the catalog still count.
	for k, n := range counts {
		if !seen[k] {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), k.ServiceID, string(k.State))
		}
	}
}

// RegisterQueueMetrics registers asynq's queue collector (asynq_queue_size,
// asynq_queue_latency_seconds, asynq_tasks_processed_total, ...) read
// through inspector at scrape time.
func RegisterQueueMetrics(reg prometheus.Registerer, inspector *asynq.Inspector) error {
	return reg.Register(metrics.NewQueueMetricsCollector(inspector))
}
