package main

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
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
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestWorkerHelp(t *testing.T) {
	t.Parallel()
	env, _, errOut := testEnv(nil)
	require.Equal(t, 0, run(context.Background(), []string{"worker", "--help"}, env))
	help := errOut.String()
	for _, want := range []string{"usage: vaultfleet worker", "-concurrency", "-shutdown-timeout", "-addr", ":9101",
		"-redis", envWorkerConcurrency, envWorkerShutdownTimeout, envRedisURL, secrets.EnvKeys, "default 20", "25s"} {
		require.Contains(t, help, want)
	}
	require.True(t, knownEnv(envWorkerConcurrency))
	require.True(t, knownEnv(envWorkerShutdownTimeout))
	require.True(t, knownEnv("SALESFORCE_CLIENT_ID"), "client credentials the built-in catalog names")
	require.True(t, knownEnv("SALESFORCE_CLIENT_SECRET"))
}

func TestWorkerBadConfig(t *testing.T) {
	t.Parallel()
	cases := map[string]struct {
		args []string
		vars map[string]string
		want string
	}{
		"ConcurrencyEnv":   {vars: map[string]string{envWorkerConcurrency: "lots"}, want: envWorkerConcurrency},
		"ConcurrencyZero":  {args: []string{"--concurrency", "0"}, want: "--concurrency"},
		"ShutdownEnv":      {vars: map[string]string{envWorkerShutdownTimeout: "25"}, want: envWorkerShutdownTimeout},
		"ShutdownNegative": {args: []string{"--shutdown-timeout", "-1s"}, want: "--shutdown-timeout"},
		"NoKeys":           {want: secrets.EnvKeys},
		"BadLogLevel":      {vars: map[string]string{secrets.EnvKeys: testKeys}, args: []string{"--log-level", "loud"}, want: `--log-level: "loud" is not one of debug, info, warn, error`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			env, _, errOut := testEnv(tc.vars)
			require.Equal(t, 1, run(context.Background(), append([]string{"worker"}, tc.args...), env))
			msg := errOut.String()
			require.Equal(t, 1, strings.Count(msg, "\n"), "one line: %q", msg)
			require.True(t, strings.HasPrefix(msg, "vaultfleet worker: "), msg)
			require.Contains(t, msg, tc.want)
		})
	}
	t.Run("FlagWinsOverBadEnv", func(t *testing.T) {
		t.Parallel()
		env, _, errOut := testEnv(map[string]string{envWorkerConcurrency: "lots"})
		require.Equal(t, 1, run(context.Background(), []string{"worker", "--concurrency", "5"}, env))
		require.NotContains(t, errOut.String(), envWorkerConcurrency)
	})
}

// TestWorkerCommand runs `vaultfleet worker` against a private Redis: it
// serves its ops endpoints, processes a task, and stops when its context
// ends.
func TestWorkerCommand(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	env, _, errOut := testEnv(map[string]string{
		envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys,
		envWorkerConcurrency: "4", envWorkerShutdownTimeout: "2s",
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"worker", "--addr", "127.0.0.1:0", "--log-format", "text"}, env) }()

	var addr string
	require.Eventually(t, func() bool {
		m := regexp.MustCompile(`addr=(127\.0\.0\.1:\d+)`).FindStringSubmatch(errOut.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	}, 10*time.Second, 20*time.Millisecond, errOut.String())
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, string(b)
	}

	// A malformed task is archived at once by the running worker.
	info, err := asynq.NewClientFromRedisClient(rdb).Enqueue(
		asynq.NewTask(tasks.TypeValidate, []byte(`{}`), asynq.Queue(tasks.QueueCritical)))
	require.NoError(t, err)
	insp := asynq.NewInspectorFromRedisClient(rdb)
	require.Eventually(t, func() bool {
		ti, err := insp.GetTaskInfo(info.Queue, info.ID)
		return err == nil && ti.State == asynq.TaskStateArchived
	}, 10*time.Second, 20*time.Millisecond, errOut.String())

	status, body := get("/metrics")
	require.Equal(t, http.StatusOK, status)
	require.Contains(t, body, `vaultfleet_tasks_processed_total{outcome="archived",queue="critical",task_type="connection:validate"} 1`)
	require.Contains(t, body, `vaultfleet_verdicts_dropped_total{reason="stale_revision"} 0`)
	require.Contains(t, body, "go_goroutines")
	status, _ = get("/readyz")
	require.Equal(t, http.StatusOK, status)
	status, _ = get("/healthz")
	require.Equal(t, http.StatusOK, status)

	cancel()
	select {
	case c := <-code:
		require.Equal(t, 0, c, errOut.String())
	case <-time.After(15 * time.Second):
		t.Fatal("worker did not stop")
	}
	require.Contains(t, errOut.String(), "worker stopped")
}

// TestWorkerCommandDeliversWebhooks: with VAULTFLEET_WEBHOOKS set, the
// worker relays state-change events and delivers them, signed.
func TestWorkerCommandDeliversWebhooks(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })

	got := make(chan *http.Request, 4)
	receiver := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		got <- r
		rw.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(receiver.Close)
	dir := t.TempDir()
	hooks := filepath.Join(dir, "webhooks.yaml")
	require.NoError(t, os.WriteFile(hooks, []byte(`
- name: test
  url: `+receiver.URL+`/hook
  secret_env: WORKER_TEST_WEBHOOK_SECRET
  events: [vault.connection.created]
  allow_insecure: true
`), 0o600))

	cat, err := catalog.Default()
	require.NoError(t, err)
	kr, err := secrets.ParseKeyring(testKeys)
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: kr})
	require.NoError(t, err)
	_, err = st.Put(context.Background(), state.Ref{ConsumerID: "c1", ConnectionID: "crm+pipedrive"},
		state.Input{Credentials: map[string]string{"api_key": "secret-key"}}, 0)
	require.NoError(t, err)

	env, _, errOut := testEnv(map[string]string{
		envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys,
		envWebhooks: hooks, "WORKER_TEST_WEBHOOK_SECRET": "0123456789abcdef0123",
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"worker", "--addr", "127.0.0.1:0"}, env) }()
	select {
	case r := <-got:
		require.Equal(t, http.MethodPost, r.Method)
		require.Equal(t, "vault.connection.created", r.Header.Get("X-Vaultfleet-Event"))
		require.NotEmpty(t, r.Header.Get("X-Vaultfleet-Signature"))
	case <-time.After(20 * time.Second):
		t.Fatal("no webhook delivered: " + errOut.String())
	}
	cancel()
	select {
	case c := <-code:
		require.Equal(t, 0, c, errOut.String())
	case <-time.After(15 * time.Second):
		t.Fatal("worker did not stop")
	}
	require.NotContains(t, errOut.String(), "secret-key")
	require.NotContains(t, errOut.String(), "0123456789abcdef0123")
}
