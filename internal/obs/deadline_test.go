package obs

import (
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
)

// stallingCollector sends one metric, then blocks until released, as a
// collector reading a stalled Redis would.
type stallingCollector struct {
	desc    *prometheus.Desc
	release chan struct{}
}

func (c *stallingCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }
func (c *stallingCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, 1)
	<-c.release
}

func TestDeadlineCollectorLeavesOutStalledFamilies(t *testing.T) {
	t.Parallel()
	stall := &stallingCollector{desc: prometheus.NewDesc("test_redis_backed", "h", nil, nil), release: make(chan struct{})}
	timeouts := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vaultfleet_scrape_timeouts_total", Help: "h"}, []string{"collector"})
	reg := prometheus.NewRegistry()
	const timeout = 200 * time.Millisecond
	require.NoError(t, reg.Register(&redisCollectors{timeouts: timeouts, parts: []*deadlineCollector{
		newDeadlineCollector("stall", stall, timeout, timeouts, slog.New(slog.DiscardHandler)),
	}}))
	names := func() map[string]bool {
		mfs, err := reg.Gather()
		require.NoError(t, err)
		out := map[string]bool{}
		for _, mf := range mfs {
			out[mf.GetName()] = true
		}
		return out
	}

	start := time.Now()
	got := names()
	require.Less(t, time.Since(start), 2*time.Second)
	require.False(t, got["test_redis_backed"], "a partial family is not exported")
	require.True(t, got["vaultfleet_scrape_timeouts_total"])
	require.Equal(t, 1.0, testutil.ToFloat64(timeouts.WithLabelValues("stall")), "counted in the same scrape")

	// Still blocked: the next scrape does not start another collection.
	start = time.Now()
	require.False(t, names()["test_redis_backed"])
	require.Less(t, time.Since(start), timeout, "skipped at once")
	require.Equal(t, 2.0, testutil.ToFloat64(timeouts.WithLabelValues("stall")))

	close(stall.release)
	require.Eventually(t, func() bool { return names()["test_redis_backed"] }, 5*time.Second, 20*time.Millisecond)
}
