package tasks

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

// TestConstructorsRetention reads back from Redis how long each kind of
// task is kept after it completes, so the Asynq monitor can show its
// result.
func TestConstructorsRetention(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		build func() (*asynq.Task, error)
		want  time.Duration
	}{
		"OnDemandValidate": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonOnDemand, "od7")
		}, RetentionRequested},
		"OnDemandValidateNoKey": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonOnDemand, "")
		}, RetentionRequested},
		"CredentialsChanged": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonCredentialsChanged, "rev3")
		}, RetentionRequested},
		"Enabled": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonEnabled, "en9")
		}, RetentionRequested},
		"Confirm": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonConfirm, "confirm-3-1")
		}, RetentionScheduled},
		"ScheduledCheck": {func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonScheduled, "1700000000")
		}, RetentionScheduled},
		"OnDemandRefreshNotKept": {func() (*asynq.Task, error) {
			return NewRefreshTask("c1", "crm+hubspot", ReasonOnDemand, "")
		}, 0},
		"ExpiredRefreshNotKept": {func() (*asynq.Task, error) {
			return NewRefreshTask("c2", "crm+hubspot", ReasonExpired, "1700000000")
		}, 0},
		"Webhook": {func() (*asynq.Task, error) {
			return NewWebhookTask("1700000000000-3", "crm-sync")
		}, RetentionWebhook},
	}
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	for name, tc := range tests {
		task, err := tc.build()
		require.NoError(t, err, name)
		info, err := client.Enqueue(task)
		require.NoError(t, err, name)
		require.Equal(t, tc.want, info.Retention, name)
	}
}

// TestRetainedTaskShowsResult runs a retained task through a real asynq
// server and finds it completed, with its result, where the monitor reads
// it; a new scheduled check of the same connection (another due time) is
// not blocked by the kept one.
func TestRetainedTaskShowsResult(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	opt := asynq.RedisClientOpt{Addr: rdb.Options().Addr, DB: rdb.Options().DB}
	client := asynq.NewClient(opt)
	t.Cleanup(func() { _ = client.Close() })
	insp := asynq.NewInspector(opt)
	t.Cleanup(func() { _ = insp.Close() })

	srv := asynq.NewServer(opt, asynq.Config{Concurrency: 2, Queues: Queues(), LogLevel: asynq.FatalLevel})
	mux := asynq.NewServeMux()
	mux.HandleFunc(TypeValidate, func(_ context.Context, t *asynq.Task) error {
		_, err := t.ResultWriter().Write([]byte(`{"outcome":"valid"}`))
		return err
	})
	require.NoError(t, srv.Start(mux))
	t.Cleanup(srv.Shutdown)

	for _, key := range []string{"1700000000", "1700003600"} {
		task, err := NewValidateTask("c1", "crm+hubspot", ReasonScheduled, key)
		require.NoError(t, err)
		info, err := client.Enqueue(task)
		require.NoError(t, err, "a kept task of another due time does not block this one")
		require.Eventually(t, func() bool {
			ti, err := insp.GetTaskInfo(info.Queue, info.ID)
			return err == nil && ti.State == asynq.TaskStateCompleted
		}, 10*time.Second, 20*time.Millisecond, "task %s never showed as completed", info.ID)
		ti, err := insp.GetTaskInfo(info.Queue, info.ID)
		require.NoError(t, err)
		require.JSONEq(t, `{"outcome":"valid"}`, string(ti.Result))
	}
}

// BenchmarkRetentionMemory measures the Redis memory one retained,
// completed validation costs: its task hash (payload, message, result) and
// its entry in the completed sorted set. It processes N tasks
// (VAULTFLEET_BENCH_N, default 20,000) with a result the size the worker
// writes and reports bytes/task from MEMORY USAGE and from used_memory.
//
//	go test -run '^$' -bench RetentionMemory -benchtime 1x ./tasks
func BenchmarkRetentionMemory(b *testing.B) {
	n := 20_000
	if v, err := strconv.Atoi(os.Getenv("VAULTFLEET_BENCH_N")); err == nil && v > 0 {
		n = v
	}
	srv := redistest.New(b)
	if !srv.Real {
		b.Skip("MEMORY USAGE needs redis-server")
	}
	rdb := srv.Client(b)
	ctx := context.Background()
	opt := asynq.RedisClientOpt{Addr: srv.Addr, DB: rdb.Options().DB}
	// A result like the worker's for a periodic check (worker.Result).
	result, err := json.Marshal(map[string]any{
		"task": TypeValidate, "outcome": "valid", "verdict": "valid", "reason": "check answered 200",
		"http_status": 200, "latency_ms": 143, "duration_ms": 151, "state_before": "callable",
		"state_after": "callable", "health_before": "ok", "health_after": "ok",
		"at": time.Date(2026, 11, 30, 7, 0, 0, 0, time.UTC),
	})
	require.NoError(b, err)
	for range b.N {
		require.NoError(b, rdb.FlushDB(ctx).Err())
		client := asynq.NewClient(opt)
		base := usedMemory(b, rdb)
		for i := range n {
			task, err := NewValidateTask(fmt.Sprintf("consumer-%06d", i), "crm+salesforce", ReasonScheduled, "1700000000")
			require.NoError(b, err)
			_, err = client.Enqueue(task)
			require.NoError(b, err)
		}
		srvA := asynq.NewServer(opt, asynq.Config{Concurrency: 50, Queues: Queues(), LogLevel: asynq.FatalLevel})
		mux := asynq.NewServeMux()
		mux.HandleFunc(TypeValidate, func(_ context.Context, t *asynq.Task) error {
			_, err := t.ResultWriter().Write(result)
			return err
		})
		require.NoError(b, srvA.Start(mux))
		completed := "asynq:{" + QueueLow + "}:completed"
		require.Eventually(b, func() bool { return rdb.ZCard(ctx, completed).Val() == int64(n) },
			5*time.Minute, 100*time.Millisecond)
		srvA.Shutdown()
		_ = client.Close()
		// Let asynq's own bookkeeping (servers, workers) expire out of the
		// figure: count only task hashes and the completed set.
		var hashBytes int64
		ids := rdb.ZRange(ctx, completed, 0, 99).Val()
		for _, id := range ids {
			hashBytes += rdb.MemoryUsage(ctx, "asynq:{"+QueueLow+"}:t:"+id).Val()
		}
		perHash := float64(hashBytes) / float64(len(ids))
		perEntry := float64(rdb.MemoryUsage(ctx, completed, 0).Val()) / float64(n)
		perUsed := float64(usedMemory(b, rdb)-base) / float64(n)
		b.ReportMetric(perHash, "B/task-hash")
		b.ReportMetric(perEntry, "B/completed-entry")
		b.ReportMetric(perHash+perEntry, "B/retained-task")
		b.ReportMetric(perUsed, "B/task-used_memory")
		b.Logf("%d retained tasks, result %d B: task hash %.0f B + completed-set entry %.0f B = %.0f B; used_memory grew %.0f B per task",
			n, len(result), perHash, perEntry, perHash+perEntry, perUsed)
	}
}

func usedMemory(tb testing.TB, rdb *redis.Client) int64 {
	tb.Helper()
	info, err := rdb.InfoMap(context.Background(), "memory").Result()
	require.NoError(tb, err)
	v, err := strconv.ParseInt(info["Memory"]["used_memory"], 10, 64)
	require.NoError(tb, err)
	return v
}
