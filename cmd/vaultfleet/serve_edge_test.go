package main

import (
	"context"
	"io"
	"net/http"
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
