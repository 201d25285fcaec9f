package scheduler_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/internal/procstat"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// benchN is the number of due connections of the sweep benchmark:
// VAULTFLEET_BENCH_N, default 100,000.
func benchN(b *testing.B, def int) int {
	if v := os.Getenv("VAULTFLEET_BENCH_N"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err)
		return n
	}
	return def
}

const benchParallel = 16

// benchBatch is the scheduler's claim batch in the sweep benchmark:
// VAULTFLEET_BENCH_BATCH, default scheduler.DefaultBatch.
func benchBatch(b *testing.B) int {
	if v := os.Getenv("VAULTFLEET_BENCH_BATCH"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(b, err)
		return n
	}
	return scheduler.DefaultBatch
}

// BenchmarkSweep measures how fast one scheduler claims and enqueues a
// backlog of due checks, beside raw asynq Client.Enqueue of the same kind of
// task (tasks.NewValidateTask, so the same TaskID option; the same 16-way
// parallelism) in the same run, on a private redis-server:
//
//	VAULTFLEET_BENCH_N=1000000 go test -run '^$' -bench Sweep -benchtime 1x -timeout 60m ./scheduler
//
// VAULTFLEET_BENCH_BATCH sets the claim batch (default 500). The backlog is seeded with the store's key layout, pipelined: per
// connection a minimal record hash (v, st, svc, d), its member in the
// shard's "all" index and its due:check entry. It is due in 10 groups one
// second apart; each round advances the scheduler's clock by one group and
// sweeps it, and enqueues as many raw tasks (other ids) right before or
// after (alternating), so that both see the same machine load and the same
// Redis size. Reported: claims/s of the sweeps, raw enqueues/s, their ratio,
// Redis used_memory per seeded connection, and the peak RSS and Go heap of
// this process during the sweeps.
//
// PerClaim hides state.Store's RescheduleBatch (one Reschedule per claim);
// Batched is the store as it is: one reschedule Lua call per shard and
// batch, the path the scheduler takes in production.
func BenchmarkSweep(b *testing.B) {
	b.Run("PerClaim", func(b *testing.B) { benchSweep(b, false) })
	b.Run("Batched", func(b *testing.B) { benchSweep(b, true) })
}

func benchSweep(b *testing.B, batched bool) {
	n := benchN(b, 100_000)
	const rounds = 10
	ctx := context.Background()
	srv := redistest.New(b)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	b.Cleanup(func() { _ = rdb.Close() })
	cat := loadCatalog(b)
	store, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: testKeys(b)})
	require.NoError(b, err)
	client := asynq.NewClientFromRedisClient(rdb)

	for range b.N {
		require.NoError(b, rdb.FlushDB(ctx).Err())
		mem0 := usedMemory(b, rdb)
		base := time.Now().Add(-time.Hour).Truncate(time.Second)
		seedStart := time.Now()
		seedDue(b, rdb, store, n, func(i int) time.Time { return base.Add(time.Duration(i*rounds/n) * time.Second) })
		seedTime := time.Since(seedStart)
		mem1 := usedMemory(b, rdb)

		clk := newClock(base)
		var st scheduler.Store = perClaimStore{store}
		if batched {
			st = newBatchStore(b, store, rdb)
		}
		s, err := scheduler.New(scheduler.Config{Store: st, Catalog: cat, Client: client,
			EnqueueConcurrency: benchParallel, MaxLowPending: -1, NowFunc: clk.Now, Batch: benchBatch(b), CheckBatch: 1})
		require.NoError(b, err)
		var sweepTime, rawTime time.Duration
		peak := procstat.Sample(20 * time.Millisecond)
		for r := range rounds {
			from, to := r*n/rounds, (r+1)*n/rounds
			sweep := func() {
				clk.Set(base.Add(time.Duration(r)*time.Second + 500*time.Millisecond))
				start := time.Now()
				require.NoError(b, s.Sweep(ctx))
				sweepTime += time.Since(start)
			}
			raw := func() {
				start := time.Now()
				rawEnqueue(b, client, from, to, "raw"+strconv.Itoa(r))
				rawTime += time.Since(start)
			}
			if r%2 == 0 {
				raw()
				sweep()
			} else {
				sweep()
				raw()
			}
		}
		mem := peak()
		rss, heap := mem.RSS, mem.HeapInuse
		pending, err := rdb.LLen(ctx, "asynq:{"+tasks.QueueLow+"}:pending").Result()
		require.NoError(b, err)
		require.EqualValues(b, 2*n, pending, "every due connection enqueued once by the sweeps, once raw")
		for _, at := range dueScores(b, rdb, store.Shards(), state.IndexCheck) {
			require.True(b, at.After(clk.Now().Add(50*time.Minute)), "every member rescheduled")
		}

		rate, raw := float64(n)/sweepTime.Seconds(), float64(n)/rawTime.Seconds()
		b.ReportMetric(rate, "claims/s")
		b.ReportMetric(raw, "raw-enqueues/s")
		b.ReportMetric(rate/raw, "ratio")
		b.ReportMetric(float64(mem1-mem0)/float64(n), "redis-B/conn")
		b.ReportMetric(float64(rss)/(1<<20), "peak-RSS-MiB")
		b.ReportMetric(float64(heap)/(1<<20), "peak-heap-MiB")
		b.Logf("n=%d batch=%d seeded in %v; sweeps %v: %.0f claims/s; raw Client.Enqueue (TaskID, %d goroutines) %v: %.0f/s; ratio %.2f",
			n, benchBatch(b), seedTime.Round(time.Millisecond), sweepTime.Round(time.Millisecond), rate, benchParallel,
			rawTime.Round(time.Millisecond), raw, rate/raw)
		b.Logf("redis used_memory: seeded connections +%.1f MiB (%.0f B/conn)",
			float64(mem1-mem0)/(1<<20), float64(mem1-mem0)/float64(n))
		b.Logf("this process during the run: peak RSS %.1f MiB, peak Go heap in use %.1f MiB",
			float64(rss)/(1<<20), float64(heap)/(1<<20))
	}
}

// BenchmarkStoreMemory measures Redis memory per connection written through
// the store (sealed credentials, every index), and the store's write rate:
//
//	VAULTFLEET_BENCH_N=100000 go test -run '^$' -bench StoreMemory -benchtime 1x ./scheduler
func BenchmarkStoreMemory(b *testing.B) {
	n := benchN(b, 20_000)
	srv := redistest.New(b)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	b.Cleanup(func() { _ = rdb.Close() })
	bd := &bundle{rdb: rdb, cat: loadCatalog(b), t0: time.Now()}
	var err error
	bd.store, err = state.New(state.Config{Client: rdb, Catalog: bd.cat, Keys: testKeys(b)})
	require.NoError(b, err)
	for range b.N {
		require.NoError(b, rdb.FlushDB(context.Background()).Err())
		mem0 := usedMemory(b, rdb)
		start := time.Now()
		bd.seed(b, 0, n, func(i int) (string, state.Input) {
			if i%2 == 0 {
				return pipedrive, state.Input{Credentials: map[string]string{"api_key": "0123456789abcdef0123456789abcdef"}}
			}
			return hubspot, oauthInput(time.Now().Add(time.Hour))
		})
		elapsed := time.Since(start)
		mem1 := usedMemory(b, rdb)
		stream, err := rdb.MemoryUsage(context.Background(), state.DefaultEventStream, 0).Result()
		require.NoError(b, err)
		perConn := float64(mem1-mem0-stream) / float64(n)
		b.ReportMetric(perConn, "redis-B/conn")
		b.ReportMetric(float64(n)/elapsed.Seconds(), "puts/s")
		b.Logf("n=%d store.Put (16 goroutines) %v: %.0f puts/s; redis used_memory +%.1f MiB, of which the event stream %.1f MiB; %.0f B/conn without it (half api_key, half oauth2)",
			n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(), float64(mem1-mem0)/(1<<20), float64(stream)/(1<<20), perConn)
	}
}

// rawEnqueue enqueues validate tasks for consumers from..to-1 with key
// from 16 goroutines.
func rawEnqueue(b *testing.B, client *asynq.Client, from, to int, key string) {
	b.Helper()
	var next atomic.Int64
	next.Store(int64(from))
	var g errgroup.Group
	for range benchParallel {
		g.Go(func() error {
			for {
				i := int(next.Add(1)) - 1
				if i >= to {
					return nil
				}
				t, err := tasks.NewValidateTask(consumer(i), pipedrive, tasks.ReasonScheduled, key)
				if err != nil {
					return err
				}
				if _, err := client.Enqueue(t); err != nil && !errors.Is(err, asynq.ErrTaskIDConflict) {
					return err
				}
			}
		})
	}
	require.NoError(b, g.Wait())
}

// seedDue writes n minimal pipedrive records in the store's key layout
// (state/store_keys.go), the i-th due for a check at due(i), pipelined.
func seedDue(b *testing.B, rdb *redis.Client, store *state.Store, n int, due func(i int) time.Time) {
	b.Helper()
	ctx := context.Background()
	const chunk = 5_000
	for from := 0; from < n; from += chunk {
		pipe := rdb.Pipeline()
		for i := from; i < min(from+chunk, n); i++ {
			c := consumer(i)
			member := c + "|" + pipedrive
			tag := fmt.Sprintf("%s:{s%02d}:", state.DefaultPrefix, store.ShardOf(c))
			pipe.HSet(ctx, tag+"conn:"+member, "v", "1", "st", string(state.Added), "svc", "pipedrive", "d", `{"rv":1}`)
			pipe.ZAdd(ctx, tag+"all", redis.Z{Member: member})
			pipe.ZAdd(ctx, tag+"due:check", redis.Z{Score: float64(due(i).UnixMilli()), Member: member})
		}
		_, err := pipe.Exec(ctx)
		require.NoError(b, err)
	}
}

func usedMemory(b *testing.B, rdb *redis.Client) int64 {
	b.Helper()
	info, err := rdb.Info(context.Background(), "memory").Result()
	require.NoError(b, err)
	sc := bufio.NewScanner(strings.NewReader(info))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "used_memory:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			require.NoError(b, err)
			return n
		}
	}
	b.Fatal("no used_memory in INFO memory")
	return 0
}
