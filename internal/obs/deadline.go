package obs

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// DefaultScrapeTimeout bounds how long a scrape waits for a collector that
// reads Redis. A stalled Redis must not stall /metrics: the Go, process,
// HTTP and worker families still come out, without the Redis-backed ones.
const DefaultScrapeTimeout = 3 * time.Second

// Collector names of vaultfleet_scrape_timeouts_total.
const (
	CollectorConnections = "connections"
	CollectorQueues      = "asynq_queues"
)

// RedisCollectorsConfig configures RegisterRedisCollectors.
type RedisCollectorsConfig struct {
	// Store and Catalog feed vaultfleet_connections.
	Store   Counter
	Catalog *catalog.Catalog
	// Inspector feeds asynq's queue metrics.
	Inspector *asynq.Inspector
	// Timeout, if zero, DefaultScrapeTimeout.
	Timeout time.Duration
	// Logger, if nil, discards.
	Logger *slog.Logger
}

// RegisterRedisCollectors registers the collectors that read Redis at
// scrape time (vaultfleet_connections and asynq's queue metrics), each
// behind a deadline: a collector that has not finished within Timeout is
// abandoned for this scrape, none of its (partial) metrics are exported,
// and vaultfleet_scrape_timeouts_total{collector} counts it. While an
// abandoned collection is still running (Redis has not answered yet), the
// next scrape does not start another one.
func RegisterRedisCollectors(reg prometheus.Registerer, cfg RedisCollectorsConfig) error {
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultScrapeTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	timeouts := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vaultfleet_scrape_timeouts_total",
		Help: "Scrapes in which a collector that reads Redis did not finish within its deadline; its families were left out.",
	}, []string{"collector"})
	conns := NewConnectionsCollector(cfg.Store, cfg.Catalog, cfg.Logger)
	// The wrapper's deadline decides; the collector's own context only
	// ends an abandoned read.
	conns.timeout = 2 * cfg.Timeout
	return reg.Register(&redisCollectors{timeouts: timeouts, parts: []*deadlineCollector{
		newDeadlineCollector(CollectorConnections, conns, cfg.Timeout, timeouts, cfg.Logger),
		newDeadlineCollector(CollectorQueues, newQueueCollector(cfg.Inspector), cfg.Timeout, timeouts, cfg.Logger),
	}})
}

// redisCollectors runs its parts in parallel and exports
// vaultfleet_scrape_timeouts_total after them, so that the scrape in which
// a part timed out already counts it.
type redisCollectors struct {
	timeouts *prometheus.CounterVec
	parts    []*deadlineCollector
}

func (c *redisCollectors) Describe(ch chan<- *prometheus.Desc) {
	c.timeouts.Describe(ch)
	for _, p := range c.parts {
		p.Describe(ch)
	}
}

func (c *redisCollectors) Collect(ch chan<- prometheus.Metric) {
	var wg sync.WaitGroup
	for _, p := range c.parts {
		wg.Go(func() { p.Collect(ch) })
	}
	wg.Wait()
	c.timeouts.Collect(ch)
}

// deadlineCollector runs another collector with a deadline.
type deadlineCollector struct {
	name     string
	inner    prometheus.Collector
	timeout  time.Duration
	timeouts prometheus.Counter
	logger   *slog.Logger
	// running is true while a collection (perhaps an abandoned one) runs.
	running atomic.Bool
}

func newDeadlineCollector(name string, inner prometheus.Collector, timeout time.Duration, timeouts *prometheus.CounterVec, logger *slog.Logger) *deadlineCollector {
	return &deadlineCollector{name: name, inner: inner, timeout: timeout, timeouts: timeouts.WithLabelValues(name), logger: logger}
}

// Describe forwards the inner collector's descriptors (no Redis read).
func (c *deadlineCollector) Describe(ch chan<- *prometheus.Desc) { c.inner.Describe(ch) }

// Collect gathers the inner collector's metrics into a buffer and sends
// them only if it finished within the deadline.
func (c *deadlineCollector) Collect(ch chan<- prometheus.Metric) {
	if !c.running.CompareAndSwap(false, true) {
		c.timeouts.Inc()
		c.logger.Warn("metrics: skipped a collector still blocked on Redis since an earlier scrape", slog.String("collector", c.name))
		return
	}
	done := make(chan []prometheus.Metric, 1)
	go func() {
		defer c.running.Store(false)
		in := make(chan prometheus.Metric, 64)
		go func() {
			c.inner.Collect(in)
			close(in)
		}()
		var ms []prometheus.Metric
		for m := range in {
			ms = append(ms, m)
		}
		done <- ms
	}()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	select {
	case ms := <-done:
		for _, m := range ms {
			ch <- m
		}
	case <-ctx.Done():
		c.timeouts.Inc()
		c.logger.Warn("metrics: a collector did not finish in time; its families are left out of this scrape",
			slog.String("collector", c.name), slog.Duration("timeout", c.timeout))
	}
}
