// Package obs holds the collectors that read fleet-wide numbers from Redis
// at scrape time: connections per integration and state (from the store's
// counters, never a SCAN) and asynq's queue metrics. Export them from one
// process (serve, or dev), not from every worker.
package obs

import (
	"context"
	"log/slog"
	"regexp"
	"sync"
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

// QueueMetricRenames maps the two gauges asynq's x/metrics collector names
// with a _total suffix (which Prometheus reserves for counters, so
// `promtool check metrics` rejects them) to conventional names. The
// Prometheus recording rules in deploy/prometheus/recording.yml give the old
// names back to the Asynq monitor's charts, which query them.
var QueueMetricRenames = map[string]string{
	"asynq_tasks_enqueued_total": "asynq_tasks_enqueued",
	"asynq_queue_paused_total":   "asynq_queue_paused",
}

// RegisterQueueMetrics registers asynq's queue collector (asynq_queue_size,
// asynq_queue_latency_seconds, asynq_tasks_processed_total, ...) read
// through inspector at scrape time, with QueueMetricRenames applied.
// It has no deadline: RegisterRedisCollectors is the one processes use.
func RegisterQueueMetrics(reg prometheus.Registerer, inspector *asynq.Inspector) error {
	return reg.Register(newQueueCollector(inspector))
}

// newQueueCollector is asynq's queue collector with QueueMetricRenames.
func newQueueCollector(inspector *asynq.Inspector) prometheus.Collector {
	return &renamingCollector{inner: metrics.NewQueueMetricsCollector(inspector),
		renames: QueueMetricRenames, descs: map[*prometheus.Desc]*prometheus.Desc{}}
}

// renamingCollector re-exports some gauges of another collector under new
// names. It is unchecked (Describe sends nothing): the renamed descriptors
// are only known once the inner collector has produced metrics.
type renamingCollector struct {
	inner   prometheus.Collector
	renames map[string]string
	mu      sync.Mutex
	descs   map[*prometheus.Desc]*prometheus.Desc // inner desc -> renamed (nil: keep)
}

var fqNameRE = regexp.MustCompile(`fqName: "([^"]+)"`)
var helpRE = regexp.MustCompile(`help: "((?:[^"\\]|\\.)*)"`)

func (c *renamingCollector) Describe(chan<- *prometheus.Desc) {}

func (c *renamingCollector) Collect(ch chan<- prometheus.Metric) {
	in := make(chan prometheus.Metric)
	go func() {
		c.inner.Collect(in)
		close(in)
	}()
	for m := range in {
		renamed := c.renamed(m)
		if renamed == nil {
			ch <- m
			continue
		}
		var pb dto.Metric
		if err := m.Write(&pb); err != nil || pb.Gauge == nil {
			ch <- m
			continue
		}
		values := make([]string, 0, len(pb.Label))
		for _, l := range pb.Label {
			values = append(values, l.GetValue())
		}
		ch <- prometheus.MustNewConstMetric(renamed, prometheus.GaugeValue, pb.Gauge.GetValue(), values...)
	}
}

// renamed returns the new descriptor for m's family, or nil to keep it.
// Label names come from the metric itself, in the order Write reports them.
func (c *renamingCollector) renamed(m prometheus.Metric) *prometheus.Desc {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := m.Desc()
	if r, ok := c.descs[d]; ok {
		return r
	}
	var r *prometheus.Desc
	s := d.String()
	if fq := fqNameRE.FindStringSubmatch(s); fq != nil {
		if to, ok := c.renames[fq[1]]; ok {
			var pb dto.Metric
			if err := m.Write(&pb); err == nil {
				names := make([]string, 0, len(pb.Label))
				for _, l := range pb.Label {
					names = append(names, l.GetName())
				}
				help := "Renamed from " + fq[1] + "."
				if h := helpRE.FindStringSubmatch(s); h != nil {
					help = h[1]
				}
				r = prometheus.NewDesc(to, help, names, nil)
			}
		}
	}
	c.descs[d] = r
	return r
}
