package worker

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/procstat"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Benchmarks of whole runs: seed connections, enqueue one validation each,
// then time a worker (or a no-op asynq server with the same settings, on
// the same Redis) from start until every task is processed. They report
// tasks/s; run them once each:
//
//	go test ./worker -run '^$' -bench . -benchtime 1x
//
// Populations are sized to take about a minute at most on 2 cores.

// BenchmarkEndToEnd: a zero-latency local provider, beside the no-op
// ceiling.
// Validate is a first validation (added -> callable: a state change and
// its events); Revalidate a periodic one of connections already callable
// (no state change), the fleet's steady state.
func BenchmarkEndToEnd(b *testing.B) {
	for _, conc := range []int{50, 200} {
		b.Run(fmt.Sprintf("Noop/c%d", conc), func(b *testing.B) { benchRun(b, 5000, conc, 0, true) })
		b.Run(fmt.Sprintf("Validate/c%d", conc), func(b *testing.B) { benchRun(b, 5000, conc, 0, false) })
		b.Run(fmt.Sprintf("Revalidate/c%d", conc), func(b *testing.B) { benchRevalidate(b, 5000, conc) })
	}
}

// BenchmarkSlowProvider: a provider that answers in 100ms. At concurrency
// c the ideal rate is c/0.1s.
func BenchmarkSlowProvider(b *testing.B) {
	b.Run("Validate/c50", func(b *testing.B) { benchRun(b, 5000, 50, 100*time.Millisecond, false) })
	b.Run("Noop/c200", func(b *testing.B) { benchRun(b, 10000, 200, 0, true) })
	b.Run("Validate/c200", func(b *testing.B) { benchRun(b, 10000, 200, 100*time.Millisecond, false) })
}

func benchRun(b *testing.B, n, concurrency int, latency time.Duration, noop bool) {
	benchRunWith(b, n, concurrency, latency, noop, nil)
}

// benchRevalidate validates every connection once before the timed run.
func benchRevalidate(b *testing.B, n, concurrency int) {
	benchRunWith(b, n, concurrency, 0, false, func(env *bundle) {
		w := env.worker(func(c *Config) { c.Logger = nil })
		h := w.Handler()
		var wg sync.WaitGroup
		var next atomic.Int64
		for range 16 {
			wg.Go(func() {
				for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
					task, err := tasks.NewValidateTask("c"+strconv.Itoa(i), "crm+acme", tasks.ReasonOnDemand, "")
					if err == nil {
						err = h.ProcessTask(context.Background(), task)
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
	})
}

func benchRunWith(b *testing.B, n, concurrency int, latency time.Duration, noop bool, prepare func(*bundle)) {
	for b.Loop() {
		b.StopTimer()
		env := setup(b)
		env.p.handle("/acme/me", func(rw http.ResponseWriter, r *http.Request) {
			if latency > 0 {
				time.Sleep(latency)
			}
			rw.WriteHeader(http.StatusOK)
		})
		seed(b, env, n)
		if prepare != nil {
			prepare(env)
		}

		var processed func() int
		var run func(ctx context.Context) error
		if noop {
			var count atomic.Int64
			srv := asynq.NewServerFromRedisClient(env.rdb, asynq.Config{
				Concurrency: concurrency, Queues: tasks.Queues(), TaskCheckInterval: 100 * time.Millisecond,
				DelayedTaskCheckInterval: 100 * time.Millisecond, LogLevel: asynq.ErrorLevel,
			})
			processed = func() int { return int(count.Load()) }
			run = func(ctx context.Context) error {
				if err := srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
					count.Add(1)
					return nil
				})); err != nil {
					return err
				}
				<-ctx.Done()
				srv.Shutdown()
				return nil
			}
		} else {
			w := env.worker(func(c *Config) {
				c.Concurrency = concurrency
				c.Logger = nil
			})
			processed = func() int {
				return int(testutil.ToFloat64(w.metrics.tasksProcessed.WithLabelValues(tasks.QueueCritical, tasks.TypeValidate, taskSuccess)))
			}
			run = w.Run
		}

		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		// The process also holds the benchmark's provider and Redis
		// clients: the memory peaks are an upper bound for the worker alone.
		stopMem := procstat.Sample(100 * time.Millisecond)
		redisCPU0 := redisCPU(env)
		cpu0 := procstat.CPU()
		b.StartTimer()
		start := time.Now()
		go func() { done <- run(ctx) }()
		for processed() < n {
			time.Sleep(5 * time.Millisecond)
		}
		elapsed := time.Since(start)
		b.StopTimer()
		cpu := procstat.CPU() - cpu0
		rcpu := redisCPU(env) - redisCPU0
		mem := stopMem()
		cancel()
		require.NoError(b, <-done)

		rate := float64(n) / elapsed.Seconds()
		b.ReportMetric(rate, "tasks/s")
		b.ReportMetric(float64(n), "tasks")
		// CPU per task says what the rate alone cannot on a shared
		// machine: the process (worker, asynq, the provider) and Redis.
		b.ReportMetric(float64(cpu.Microseconds())/float64(n), "proc-cpu-us/task")
		b.ReportMetric(float64(rcpu.Microseconds())/float64(n), "redis-cpu-us/task")
		b.ReportMetric(float64(mem.HeapInuse)/(1<<20), "peak-heap-inuse-MiB")
		b.ReportMetric(float64(mem.Sys)/(1<<20), "peak-go-sys-MiB")
		if rss := mem.RSS; rss > 0 {
			b.ReportMetric(float64(rss)/(1<<20), "peak-rss-MiB")
		}
		if !noop {
			// Every validation applied its verdict.
			c, err := env.store.Get(context.Background(), state.Ref{ConsumerID: "c0", ConnectionID: "crm+acme"})
			require.NoError(b, err)
			require.Equal(b, state.Callable, c.State)
		}
		b.StartTimer()
	}
}

// seed stores n acme connections and enqueues one validation for each.
func seed(b *testing.B, env *bundle, n int) { seedTB(b, env, n) }

func seedTB(b testing.TB, env *bundle, n int) {
	client := asynq.NewClientFromRedisClient(env.rdb)
	var wg sync.WaitGroup
	var next atomic.Int64
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				ref := state.Ref{ConsumerID: "c" + strconv.Itoa(i), ConnectionID: "crm+acme"}
				_, err := env.store.Put(context.Background(), ref, state.Input{Credentials: acmeKey()}, 0)
				if err != nil {
					b.Error(err)
					return
				}
				task, err := tasks.NewValidateTask(ref.ConsumerID, ref.ConnectionID, tasks.ReasonOnDemand, "")
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := client.Enqueue(task); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
}

// redisCPU is the CPU time the Redis server has used so far.
func redisCPU(env *bundle) time.Duration {
	info, err := env.rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		return 0
	}
	var total float64
	for line := range strings.SplitSeq(info, "\n") {
		line = strings.TrimSpace(line)
		for _, k := range []string{"used_cpu_sys:", "used_cpu_user:"} {
			if v, ok := strings.CutPrefix(line, k); ok {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
	}
	return time.Duration(total * float64(time.Second))
}
