// Package obs holds the collectors that read fleet-wide numbers from Redis
// at scrape time: connections per integration and state (from the store's
// counters, never a SCAN) and asynq's queue metrics. Export them from one
// process (serve, or dev), not from every worker.
package obs

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
	"github.com/hibiken/asynq/x/metrics"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

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
		store: store, cat: cat, timeout: DefaultScrapeTimeout, logger: logger,
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
		for _, s := range state.States() {
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

// queueMetricName maps the two gauges asynq's x/metrics collector names
// with a _total suffix (which Prometheus reserves for counters, so
// `promtool check metrics` rejects them) to conventional names, and keeps
// every other name. The Prometheus recording rules in
// deploy/prometheus/recording.yml give the old names back to the Asynq
// monitor's charts, which query them.
func queueMetricName(name string) string {
	switch name {
	case "asynq_tasks_enqueued_total":
		return "asynq_tasks_enqueued"
	case "asynq_queue_paused_total":
		return "asynq_queue_paused"
	}
	return name
}

// RegisterQueueMetrics registers asynq's queue collector (asynq_queue_size,
// asynq_queue_latency_seconds, asynq_tasks_processed_total, ...) read
// through inspector at scrape time, with the names of queueMetricName.
// It has no deadline: RegisterRedisCollectors is the one processes use.
func RegisterQueueMetrics(reg prometheus.Registerer, inspector *asynq.Inspector) error {
	return reg.Register(newQueueCollector(inspector))
}

// newQueueCollector is asynq's queue collector renamed by queueMetricName.
func newQueueCollector(inspector *asynq.Inspector) prometheus.Collector {
	return newRenamingCollector(metrics.NewQueueMetricsCollector(inspector), queueMetricName)
}

// renamingCollector re-exports the metrics of another collector with the
// family names rename gives. It reads them through a private registry's
// Gather, which reports each family's name, help, type and label names
// as data, so nothing depends on how a Desc prints itself. It is
// unchecked (Describe sends nothing): the inner collector is registered
// unchecked too, so that registration does not call asynq's Describe,
// which collects, that is, reads Redis.
type renamingCollector struct {
	reg    *prometheus.Registry
	rename func(string) string
}

func newRenamingCollector(inner prometheus.Collector, rename func(string) string) *renamingCollector {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(uncheckedCollector{inner})
	return &renamingCollector{reg: reg, rename: rename}
}

// uncheckedCollector hides a collector's descriptors from its registry.
type uncheckedCollector struct{ prometheus.Collector }

func (uncheckedCollector) Describe(chan<- *prometheus.Desc) {}

func (c *renamingCollector) Describe(chan<- *prometheus.Desc) {}

// renameErrDesc names a failure to gather the inner collector: it only
// ever reports an error to the scrape (prometheus.NewInvalidMetric), never
// a series.
var renameErrDesc = prometheus.NewDesc("renamed_collector_gather_error",
	"The inner collector of a renaming collector failed.", nil, nil)

func (c *renamingCollector) Collect(ch chan<- prometheus.Metric) {
	families, err := c.reg.Gather()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(renameErrDesc, err)
	}
	for _, f := range families {
		name := c.rename(f.GetName())
		for _, m := range f.GetMetric() {
			names := make([]string, 0, len(m.GetLabel()))
			values := make([]string, 0, len(m.GetLabel()))
			for _, l := range m.GetLabel() {
				names = append(names, l.GetName())
				values = append(values, l.GetValue())
			}
			desc := prometheus.NewDesc(name, f.GetHelp(), names, nil)
			var (
				vt prometheus.ValueType
				v  float64
			)
			switch f.GetType() {
			case dto.MetricType_GAUGE:
				vt, v = prometheus.GaugeValue, m.GetGauge().GetValue()
			case dto.MetricType_COUNTER:
				vt, v = prometheus.CounterValue, m.GetCounter().GetValue()
			case dto.MetricType_UNTYPED:
				vt, v = prometheus.UntypedValue, m.GetUntyped().GetValue()
			default:
				ch <- prometheus.NewInvalidMetric(desc, fmt.Errorf("obs: cannot re-export %s metric %s", f.GetType(), f.GetName()))
				continue
			}
			cm, err := prometheus.NewConstMetric(desc, vt, v, values...)
			if err != nil {
				cm = prometheus.NewInvalidMetric(desc, err)
			}
			ch <- cm
		}
	}
}
