package obs

import (
	"context"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func TestConnectionsCollector(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	ctx := context.Background()
	for _, c := range []string{"c1", "c2"} {
		_, err := st.Put(ctx, state.Ref{ConsumerID: c, ConnectionID: "hris+bamboohr"},
			state.Input{Credentials: map[string]string{"api_key": "k-" + c}, Settings: map[string]string{"subdomain": "acme"}}, 0)
		require.NoError(t, err)
	}
	_, err = st.Put(ctx, state.Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"},
		state.Input{Credentials: map[string]string{"access_token": "a", "refresh_token": "r"}}, 0)
	require.NoError(t, err)

	col := NewConnectionsCollector(st, cat, nil)
	got, err := testutil.CollectAndFormat(col, expfmt.TypeTextPlain, "vaultfleet_connections")
	require.NoError(t, err)
	require.Contains(t, string(got), `vaultfleet_connections{integration="bamboohr",state="added"} 2`)
	require.Contains(t, string(got), `vaultfleet_connections{integration="xero",state="authorized"} 1`)
	require.Contains(t, string(got), `vaultfleet_connections{integration="salesforce",state="callable"} 0`, "zeros are exported too")
	require.NotContains(t, string(got), `state="available"`)
	problems, err := testutil.CollectAndLint(col)
	require.NoError(t, err)
	require.Empty(t, problems)
}

// TestQueueMetricsRenamed: asynq's gauges with a _total suffix come out
// under conventional names, the rest unchanged, and promtool accepts the
// result.
func TestQueueMetricsRenamed(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	defer client.Close()
	task, err := tasks.NewValidateTask("c1", "crm+pipedrive", tasks.ReasonOnDemand, "")
	require.NoError(t, err)
	_, err = client.Enqueue(task)
	require.NoError(t, err)
	insp := asynq.NewInspectorFromRedisClient(rdb)
	defer insp.Close()
	reg := prometheus.NewRegistry()
	require.NoError(t, RegisterQueueMetrics(reg, insp))
	mfs, err := reg.Gather()
	require.NoError(t, err)
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	require.True(t, names["asynq_tasks_enqueued"])
	require.True(t, names["asynq_queue_paused"])
	require.True(t, names["asynq_queue_size"])
	require.False(t, names["asynq_tasks_enqueued_total"])
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	out := rec.Body.String()
	require.Contains(t, out, `asynq_tasks_enqueued{queue="critical",state="pending"} 1`)
	if p, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(p, "check", "metrics")
		cmd.Stdin = strings.NewReader(out)
		res, err := cmd.CombinedOutput()
		require.NoError(t, err, "promtool: %s", res)
	}
}

// TestRenamingCollector: family names are mapped from gathered data (help,
// type and labels kept), the inner collector is not collected at
// registration, and a family that cannot be re-exported is an error, not
// a silent loss.
func TestRenamingCollector(t *testing.T) {
	t.Parallel()
	gauge := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "x_items_total", Help: "Items \"quoted\" help."}, []string{"queue", "state"})
	gauge.WithLabelValues("default", "pending").Set(3)
	counter := prometheus.NewCounter(prometheus.CounterOpts{Name: "x_done_total", Help: "Done."})
	counter.Add(2)
	collected := 0
	c := newRenamingCollector(collectorFunc(func(ch chan<- prometheus.Metric) {
		collected++
		gauge.Collect(ch)
		counter.Collect(ch)
	}), func(name string) string {
		if name == "x_items_total" {
			return "x_items"
		}
		return name
	})
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	require.Zero(t, collected, "registration must not collect")
	require.NoError(t, testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP x_done_total Done.
# TYPE x_done_total counter
x_done_total 2
# HELP x_items Items "quoted" help.
# TYPE x_items gauge
x_items{queue="default",state="pending"} 3
`)))
	require.Equal(t, 1, collected)

	hist := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "x_seconds", Help: "h"})
	bad := prometheus.NewRegistry()
	require.NoError(t, bad.Register(newRenamingCollector(hist, func(s string) string { return s })))
	_, err := bad.Gather()
	require.ErrorContains(t, err, "cannot re-export HISTOGRAM metric x_seconds")
}

type collectorFunc func(chan<- prometheus.Metric)

func (f collectorFunc) Describe(chan<- *prometheus.Desc)    {}
func (f collectorFunc) Collect(ch chan<- prometheus.Metric) { f(ch) }
