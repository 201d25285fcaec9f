package main

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/tasks"
)

const edgeToken = "edge-test-token-0123456789"

// startServe runs serve in-process on a fresh private redis-server.
func startServe(t *testing.T, extra map[string]string) (*fleetProcess, *redistest.Server) {
	t.Helper()
	srv := redistest.New(t)
	vars := map[string]string{
		envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys, envAPITokens: edgeToken,
	}
	for k, v := range extra {
		vars[k] = v
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := startProcess(t, ctx, vars, "serve")
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.code:
		case <-time.After(20 * time.Second):
			t.Error("serve did not stop")
		}
	})
	return p, srv
}

// TestServeMonitorReadOnlyEnv: VAULTFLEET_MONITOR_READONLY=1 means read
// only (it used to mean false: only "true" counted), and a value that is
// no boolean is an error, not a silent false.
func TestServeMonitorReadOnlyEnv(t *testing.T) {
	if testing.Short() {
		t.Skip("runs serve")
	}
	t.Parallel()
	env, _, errOut := testEnv(map[string]string{envMonitorReadOnly: "yes please", envAPITokens: edgeToken, secrets.EnvKeys: testKeys})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"serve", "--addr", "127.0.0.1:0"}, env) }()
	select {
	case c := <-code:
		require.Equal(t, 1, c)
	case <-time.After(10 * time.Second):
		cancel()
		<-code
		t.Fatalf("serve started with %s=%q", envMonitorReadOnly, "yes please")
	}
	require.Contains(t, errOut.String(), envMonitorReadOnly)

	p, srv := startServe(t, map[string]string{envMonitorReadOnly: "1"})
	client := asynq.NewClient(asynq.RedisClientOpt{Addr: srv.Addr})
	defer client.Close()
	task, err := tasks.NewValidateTask("c1", "crm+pipedrive", tasks.ReasonOnDemand, "")
	require.NoError(t, err)
	_, err = client.Enqueue(task, asynq.Queue(tasks.QueueCritical))
	require.NoError(t, err)
	req, err := http.NewRequest(http.MethodPost, "http://"+p.addr+"/monitor/api/queues/"+tasks.QueueCritical+":pause", nil)
	require.NoError(t, err)
	req.SetBasicAuth("ops", edgeToken)
	req.Header.Set("Sec-Fetch-Site", "same-origin")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, string(b))
	in := asynq.NewInspector(asynq.RedisClientOpt{Addr: srv.Addr})
	defer in.Close()
	qi, err := in.GetQueueInfo(tasks.QueueCritical)
	require.NoError(t, err)
	require.False(t, qi.Paused)
}

// TestServeRedisStall pauses serve's Redis (SIGSTOP: connections stay
// open, nothing answers) and checks that every route that reads Redis
// answers within its deadline: /readyz 503 within about a second, API
// reads 503 within DefaultRequestTimeout, /metrics 200 without the
// Redis-backed families and with vaultfleet_scrape_timeouts_total saying
// so, the monitor and the status page 503 within pageTimeout.
func TestServeRedisStall(t *testing.T) {
	if testing.Short() {
		t.Skip("runs serve")
	}
	t.Parallel()
	p, srv := startServe(t, nil)
	if !srv.Real {
		t.Skip("needs redis-server to pause")
	}
	client := asynq.NewClient(asynq.RedisClientOpt{Addr: srv.Addr})
	defer client.Close()
	task, err := tasks.NewValidateTask("c1", "crm+pipedrive", tasks.ReasonOnDemand, "")
	require.NoError(t, err)
	_, err = client.Enqueue(task, asynq.Queue(tasks.QueueCritical))
	require.NoError(t, err)
	base := "http://" + p.addr
	hc := &http.Client{Timeout: 30 * time.Second}
	get := func(path string) (int, string, time.Duration) {
		req, err := http.NewRequest(http.MethodGet, base+path, nil)
		require.NoError(t, err)
		req.SetBasicAuth("ops", edgeToken) // the monitor and the page
		if strings.HasPrefix(path, "/v1/") {
			req.Header.Set("Authorization", "Bearer "+edgeToken)
		}
		start := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err.Error(), time.Since(start)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), time.Since(start)
	}
	code, body, _ := get("/metrics")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "asynq_queue_size{")
	require.Contains(t, body, "vaultfleet_connections{")
	require.Contains(t, body, `vaultfleet_scrape_timeouts_total{collector="asynq_queues"} 0`)

	srv.Pause(t)
	type answer struct {
		path       string
		code       int
		body       string
		took, want time.Duration
	}
	routes := map[string]time.Duration{
		"/readyz":                        1500 * time.Millisecond,
		"/v1/connections?limit=10":       4500 * time.Millisecond,
		"/v1/consumers/acme/connections": 4500 * time.Millisecond,
		"/metrics":                       4500 * time.Millisecond,
		"/monitor/api/queues":            pageTimeout + 1500*time.Millisecond,
		"/":                              pageTimeout + 1500*time.Millisecond,
	}
	answers := make(chan answer, len(routes))
	for path, want := range routes {
		go func() {
			code, body, took := get(path)
			answers <- answer{path, code, body, took, want}
		}()
	}
	for range routes {
		a := <-answers
		t.Logf("Redis paused: %s answered %d in %s", a.path, a.code, a.took.Round(10*time.Millisecond))
		require.Less(t, a.took, a.want, "%s took %s (%d %q)", a.path, a.took, a.code, tail(a.body, 300))
		if a.path == "/metrics" {
			require.Equal(t, http.StatusOK, a.code)
			require.Contains(t, a.body, "go_goroutines")
			require.NotContains(t, a.body, "asynq_queue_size{")
			require.NotContains(t, a.body, "vaultfleet_connections{")
			require.Contains(t, a.body, `vaultfleet_scrape_timeouts_total{collector="asynq_queues"} 1`)
			require.Contains(t, a.body, `vaultfleet_scrape_timeouts_total{collector="connections"} 1`)
			continue
		}
		require.Equal(t, http.StatusServiceUnavailable, a.code, "%s: %s", a.path, a.body)
	}
}
