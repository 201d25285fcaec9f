package main

import (
	"context"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// schedTestBuffer is a bytes.Buffer safe for a process writing logs while
// the test reads them.

func TestSchedulerHelp(t *testing.T) {
	t.Parallel()
	env, _, errOut := testEnv(nil)
	require.Equal(t, 0, run(context.Background(), []string{"scheduler", "--help"}, env))
	help := errOut.String()
	for _, want := range []string{"usage: vaultfleet scheduler", "-tick", "-batch", "-lease", "-jitter",
		"-max-low-pending", "-enqueue-concurrency", "-check-batch", "-addr", "-redis", ":9102",
		envSchedTick, envSchedBatch, envSchedLease, envSchedJitter, envSchedMaxLowPending,
		envSchedEnqueueConcurrency, envSchedCheckBatch, envRedisURL, secrets.EnvKeys} {
		require.Contains(t, help, want)
	}
	for _, e := range []string{envSchedTick, envSchedBatch, envSchedLease, envSchedJitter,
		envSchedMaxLowPending, envSchedEnqueueConcurrency, envSchedCheckBatch} {
		require.True(t, knownEnv(e), "%s registered in knownEnv", e)
	}
}

func TestSchedulerBadConfig(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		args    []string
		env     map[string]string
		wantErr string
	}{
		"Jitter":        {args: []string{"--jitter", "0.9"}, wantErr: "--jitter must be between 0 and 0.5"},
		"Lease":         {args: []string{"--lease", "10ms"}, wantErr: "--lease must be at least 1s"},
		"Batch":         {args: []string{"--batch", "0"}, wantErr: "--batch must be between 1 and 100000"},
		"Tick":          {args: []string{"--tick", "0s"}, wantErr: "--tick must be positive"},
		"MaxLowPending": {args: []string{"--max-low-pending", "-1"}, wantErr: "--max-low-pending must not be negative"},
		"CheckBatch":    {args: []string{"--check-batch", "0"}, wantErr: "--check-batch must be between 1 and 500"},
		"EnvCheckBatch": {env: map[string]string{envSchedCheckBatch: "501"}, wantErr: envSchedCheckBatch + " (--check-batch) must be between 1 and 500, got 501"},
		"EnvTick":       {env: map[string]string{envSchedTick: "soon"}, wantErr: envSchedTick + ` (--tick): "soon" is not a duration`},
		"EnvBatch":      {env: map[string]string{envSchedBatch: "many"}, wantErr: envSchedBatch + ` (--batch): "many" is not a whole number`},
		"EnvJitter":     {env: map[string]string{envSchedJitter: "lots"}, wantErr: envSchedJitter + ` (--jitter): "lots" is not a number`},
		"NoKeys":        {args: []string{"--redis", "redis://127.0.0.1:1/0"}, wantErr: "no encryption key"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			env, _, errOut := testEnv(tc.env)
			code := run(context.Background(), append([]string{"scheduler"}, tc.args...), env)
			require.Equal(t, 1, code, errOut.String())
			require.Contains(t, errOut.String(), tc.wantErr)
			require.Equal(t, 1, strings.Count(strings.TrimSpace(errOut.String()), "\n")+1, "one line: %q", errOut.String())
		})
	}
	env, _, _ := testEnv(nil)
	require.Equal(t, 2, run(context.Background(), []string{"scheduler", "--no-such-flag"}, env))
}

// TestSchedulerCommand runs `vaultfleet scheduler` against a private Redis:
// a due connection is enqueued, /metrics counts it, and the process stops
// cleanly when its context ends.
func TestSchedulerCommand(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	cat, err := catalog.Default()
	require.NoError(t, err)
	kr, err := secrets.ParseKeyring(testKeys)
	require.NoError(t, err)
	// Written a minute ago: its first check (30s after the write) is due.
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: kr,
		NowFunc: func() time.Time { return time.Now().Add(-time.Minute) }})
	require.NoError(t, err)
	_, err = st.Put(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+pipedrive"},
		state.Input{Credentials: map[string]string{"api_key": "secret-key"}}, 0)
	require.NoError(t, err)

	env, _, errOut := testEnv(map[string]string{
		envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys, envSchedTick: "50ms",
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"scheduler", "--addr", "127.0.0.1:0", "--log-format", "text"}, env) }()

	insp := asynq.NewInspectorFromRedisClient(rdb)
	require.Eventually(t, func() bool {
		ts, err := insp.ListPendingTasks(tasks.QueueLow)
		return err == nil && len(ts) == 1
	}, 10*time.Second, 20*time.Millisecond, errOut.String())
	ts, err := insp.ListPendingTasks(tasks.QueueLow)
	require.NoError(t, err)
	require.Equal(t, tasks.TypeValidate, ts[0].Type)
	require.NotContains(t, string(ts[0].Payload), "secret-key")

	m := regexp.MustCompile(`addr=(127\.0\.0\.1:\d+)`).FindStringSubmatch(errOut.String())
	require.NotNil(t, m, errOut.String())
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + m[1] + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(b)
	}
	status, body := get("/metrics")
	require.Equal(t, http.StatusOK, status)
	require.Contains(t, body, `vaultfleet_scheduler_enqueued_total{task="validate"} 1`)
	require.Contains(t, body, `vaultfleet_scheduler_backpressure 0`)
	require.Contains(t, body, `vaultfleet_scheduler_sweep_duration_seconds_bucket{index="check"`)
	status, _ = get("/readyz")
	require.Equal(t, http.StatusOK, status)

	cancel()
	select {
	case c := <-code:
		require.Equal(t, 0, c, errOut.String())
	case <-time.After(10 * time.Second):
		t.Fatal("scheduler did not stop")
	}
	require.Contains(t, errOut.String(), "scheduler: stopped")
	require.NotContains(t, errOut.String(), "secret-key")
}

// TestSchedulerCheckBatchReachesTheScheduler: --check-batch and
// VAULTFLEET_CHECK_BATCH set scheduler.Config.CheckBatch; unset, the
// scheduler's default.
func TestSchedulerCheckBatchReachesTheScheduler(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		vars map[string]string
		args []string
		want int
	}{
		{nil, nil, scheduler.DefaultCheckBatch},
		{nil, []string{"--check-batch", "7"}, 7},
		{map[string]string{envSchedCheckBatch: "1"}, nil, 1},
	} {
		conf, err := parseWith(cmdScheduler, tc.vars, tc.args...)
		require.NoError(t, err)
		require.Equal(t, tc.want, schedulerFlagsFrom(conf).config().CheckBatch, "%v %v", tc.vars, tc.args)
	}
}
