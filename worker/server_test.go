package worker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// leakCheck verifies, after every other cleanup of the test, that the test
// left no goroutine behind.
func leakCheck(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		goleak.VerifyNone(t, opt,
			// net/http keeps a keep-alive connection's reader for a moment
			// after the client side closes it.
			goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
			goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
			// asynq arms a timer-driven close of its abort channel at
			// shutdown that fires after ShutdownTimeout.
			goleak.IgnoreAnyFunction("time.goFunc"),
		)
	})
}

func TestServerTransientRetriedStateUnchanged(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	b.p.handle("/acme/me", status(503))
	b.put("crm+acme", acmeKey(), nil)
	b.start(b.worker())
	info := b.enqueue(validateTask(t, "crm+acme"))
	ins := b.inspector()
	eventually(t, 15*time.Second, func() bool { return b.p.count("/acme/me") >= 3 }, "retried")
	ti, err := ins.GetTaskInfo(info.Queue, info.ID)
	require.NoError(t, err)
	require.GreaterOrEqual(t, ti.Retried, 2)
	require.Contains(t, ti.LastErr, "status 503")
	c := b.get("crm+acme")
	require.Equal(t, state.Added, c.State)
	require.Nil(t, c.Verdict)
	require.GreaterOrEqual(t, c.Transient.Failures, 2)

	b.p.handle("/acme/me", status(200))
	eventually(t, 15*time.Second, func() bool { return b.get("crm+acme").State == state.Callable }, "callable after recovery")
}

func TestServerMalformedArchivedAtOnce(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	w := b.worker()
	b.start(w)
	info := b.enqueue(asynq.NewTask(tasks.TypeValidate, []byte(`{"v":1,"consumer_id":"c1"}`),
		asynq.Queue(tasks.QueueCritical), asynq.MaxRetry(12)))
	ti := b.awaitTask(info, asynq.TaskStateArchived, 10*time.Second)
	require.Zero(t, ti.Retried)
	require.Contains(t, ti.LastErr, "malformed payload")
	require.Contains(t, ti.LastErr, "connection_id")
	require.Equal(t, "malformed", decodeResult(t, ti.Result).Outcome)
	require.Equal(t, 1.0, testutil.ToFloat64(w.metrics.tasksProcessed.WithLabelValues(tasks.QueueCritical, tasks.TypeValidate, taskArchived)))
}

// TestServerShutdownPutsTaskBack: the worker is told to stop (SIGTERM)
// while a slow check is in flight; the task goes back to its queue and a
// new worker processes it.
func TestServerShutdownPutsTaskBack(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	var slow atomic.Bool
	slow.Store(true)
	entered := make(chan struct{}, 4)
	b.p.handle("/acme/me", func(rw http.ResponseWriter, r *http.Request) {
		if slow.Load() {
			entered <- struct{}{}
			<-r.Context().Done() // hangs until the worker gives up
			return
		}
		rw.WriteHeader(http.StatusOK)
	})
	b.put("crm+acme", acmeKey(), nil)
	w1 := b.worker(func(c *Config) { c.ShutdownTimeout = 300 * time.Millisecond; c.CheckTimeout = 30 * time.Second })
	stop := b.start(w1)
	info := b.enqueue(validateTask(t, "crm+acme"))
	<-entered
	start := time.Now()
	stop() // returns once the server has shut down
	require.Less(t, time.Since(start), 5*time.Second)

	ins := b.inspector()
	ti, err := ins.GetTaskInfo(info.Queue, info.ID)
	require.NoError(t, err)
	require.Equal(t, asynq.TaskStatePending, ti.State, "put back in its queue")
	require.Zero(t, ti.Retried, "without using up a retry")
	c := b.get("crm+acme")
	require.Equal(t, state.Added, c.State)
	require.Zero(t, c.Transient.Failures, "our own shutdown is no provider trouble")

	slow.Store(false)
	b.start(b.worker())
	eventually(t, 10*time.Second, func() bool { return b.get("crm+acme").State == state.Callable }, "processed by the new worker")
	eventually(t, 5*time.Second, func() bool {
		qi, err := ins.GetQueueInfo(info.Queue)
		return err == nil && qi.Size-qi.Completed == 0 // completed tasks are kept (tasks.Retention*)
	}, "queue drained")
	require.Equal(t, 2, b.p.count("/acme/me"))
}

func TestServerCircuitBreaker(t *testing.T) {
	b := setup(t)
	b.p.handle("/acme/me", status(500))
	const n = 40
	for i := range n {
		_, err := b.store.Put(context.Background(), state.Ref{ConsumerID: fmt.Sprintf("c%d", i), ConnectionID: "crm+acme"},
			state.Input{Credentials: acmeKey()}, 0)
		require.NoError(t, err)
	}
	w := b.worker(func(c *Config) {
		c.Concurrency = 5
		c.BreakerMinRequests = 10
		c.BreakerFailureRatio = 0.5
		c.BreakerCoolDown = 3 * time.Second
		c.BreakerProbes = 2
	})
	open := func() float64 { return testutil.ToFloat64(w.metrics.circuitOpen.WithLabelValues("acme")) }
	b.start(w)
	client := asynq.NewClientFromRedisClient(b.rdb)
	for i := range n {
		task, err := tasks.NewValidateTask(fmt.Sprintf("c%d", i), "crm+acme", tasks.ReasonOnDemand, "")
		require.NoError(t, err)
		_, err = client.Enqueue(task)
		require.NoError(t, err)
	}
	checks := func(outcome string) int {
		return int(testutil.ToFloat64(w.metrics.checks.WithLabelValues("acme", outcome)))
	}
	eventually(t, 20*time.Second, func() bool { return open() == 1 }, "breaker opens")
	opened := time.Now()
	// Checks already past the breaker land: every call the provider saw
	// has been answered and recorded as transient.
	var calls int
	eventually(t, 10*time.Second, func() bool {
		calls = b.p.count("/acme/me")
		return checks(outcomeTransient) == calls
	}, "calls in flight when the breaker opened land")
	require.Less(t, calls, n, "the breaker opened before every connection was tried")
	// Tasks keep coming and the breaker turns them away without a call.
	skipped := checks(outcomeSkipped)
	eventually(t, 10*time.Second, func() bool { return checks(outcomeSkipped) >= skipped+5 }, "tasks held by the open breaker")
	if time.Since(opened) < 3*time.Second { // still within the cool-down: not even a probe
		require.Equal(t, calls, b.p.count("/acme/me"), "no provider call while the breaker is open")
	} else {
		require.LessOrEqual(t, b.p.count("/acme/me"), calls+2, "at most the half-open probes")
	}
	for i := range n {
		c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: fmt.Sprintf("c%d", i), ConnectionID: "crm+acme"})
		require.NoError(t, err)
		require.Equal(t, state.Added, c.State)
		require.Nil(t, c.Verdict)
	}

	// The provider recovers: probes pass after the cool-down, the breaker
	// closes and every connection gets its verdict.
	b.p.handle("/acme/me", status(200))
	eventually(t, 30*time.Second, func() bool {
		for i := range n {
			c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: fmt.Sprintf("c%d", i), ConnectionID: "crm+acme"})
			if err != nil || c.State != state.Callable {
				return false
			}
		}
		return true
	}, "all callable after recovery")
	require.Zero(t, open())
	ins := b.inspector()
	qi, err := ins.GetQueueInfo(tasks.QueueCritical)
	require.NoError(t, err)
	require.Zero(t, qi.Archived, "breaker-held tasks are never failed")
}

// TestServerRateLimitFleetWide: three workers share the integration's
// limit of 10 requests per second; the provider never sees more than 10
// in any one-second window.
func TestServerRateLimitFleetWide(t *testing.T) {
	b := setup(t)
	b.p.handle("/limited/me", status(200))
	const n = 45
	client := asynq.NewClientFromRedisClient(b.rdb)
	for i := range n {
		ref := state.Ref{ConsumerID: fmt.Sprintf("c%d", i), ConnectionID: "crm+limited"}
		_, err := b.store.Put(context.Background(), ref, state.Input{Credentials: acmeKey()}, 0)
		require.NoError(t, err)
		task, err := tasks.NewValidateTask(ref.ConsumerID, ref.ConnectionID, tasks.ReasonOnDemand, "")
		require.NoError(t, err)
		_, err = client.Enqueue(task)
		require.NoError(t, err)
	}
	var ws []*Worker
	for range 3 {
		w := b.worker(func(c *Config) { c.Concurrency = 10 })
		ws = append(ws, w)
		b.start(w)
	}
	eventually(t, 60*time.Second, func() bool { return b.p.count("/limited/me") >= n }, "all checked")
	eventually(t, 10*time.Second, func() bool {
		valid := 0.0
		for _, w := range ws {
			valid += testutil.ToFloat64(w.metrics.checks.WithLabelValues("limited", outcomeValid))
		}
		return valid == n
	}, "all valid")
	b.p.mu.Lock()
	arrivals := append([]time.Time(nil), b.p.arrivals...)
	b.p.mu.Unlock()
	sort.Slice(arrivals, func(i, j int) bool { return arrivals[i].Before(arrivals[j]) })
	worst := 0
	for i := range arrivals {
		j := i
		for j < len(arrivals) && arrivals[j].Sub(arrivals[i]) < time.Second {
			j++
		}
		worst = max(worst, j-i)
	}
	t.Logf("%d requests in %s, at most %d in any one-second window",
		len(arrivals), arrivals[len(arrivals)-1].Sub(arrivals[0]).Round(time.Millisecond), worst)
	require.LessOrEqual(t, worst, 10)
	// And the limit is used, not just respected.
	require.Less(t, arrivals[len(arrivals)-1].Sub(arrivals[0]), 10*time.Second)
	rateLimited := 0.0
	for _, w := range ws {
		rateLimited += testutil.ToFloat64(w.metrics.checks.WithLabelValues("limited", outcomeRateLimited))
	}
	t.Logf("tasks put back by the rate limit: %v", rateLimited)
}

// A task that fails while Redis is away is retried soon after Redis comes
// back, not after asynq's lease and recoverer (30 to 90 s): the handler
// holds the failure until Redis answers (settle.go), so asynq's own write
// of the retry succeeds.
func TestServerFailureDuringRedisOutageRetriedSoon(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	if !srv.Real {
		t.Skip("needs redis-server: the outage is a stopped process")
	}
	b := setup(t)
	b.rdb = srv.Client(t)
	b.store = b.newStore(b.cat)
	runs := make(chan time.Time, 4)
	var n atomic.Int32
	w := b.worker(func(c *Config) {
		c.Handlers = map[string]asynq.Handler{"test:blink": asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
			runs <- time.Now()
			if n.Add(1) == 1 {
				srv.Pause(t) // Redis stops answering as this task fails
				return errors.New("provider answered 503")
			}
			return nil
		})}
	})
	b.start(w)
	b.enqueue(asynq.NewTask("test:blink", nil, asynq.Queue(tasks.QueueCritical), asynq.MaxRetry(3)))
	first := <-runs
	// Longer than asynq's write of the retry keeps trying (go-redis: a 3 s
	// read timeout, 3 retries), so that write fails.
	time.Sleep(14 * time.Second)
	srv.Resume()
	resumed := time.Now()
	select {
	case second := <-runs:
		t.Logf("failed at %s, Redis back after %s, retried %s after that",
			first.Format(time.TimeOnly), resumed.Sub(first).Round(time.Millisecond), second.Sub(resumed).Round(time.Millisecond))
		require.Less(t, second.Sub(resumed), 10*time.Second, "retried soon after Redis came back")
	case <-time.After(25 * time.Second):
		t.Log(b.logs.String())
		t.Fatal("not retried within 25s of Redis coming back (asynq's lease and recoverer would take 30-90s)")
	}
}

// TestStartShutdown: Start returns once the server runs (a task is then
// processed without anything else being called), Shutdown stops it and
// waits, and the pair refuses what would run a Worker twice.
func TestStartShutdown(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	b.p.handle("/acme/me", status(200))
	b.put("crm+acme", acmeKey(), nil)
	w := b.worker()

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, w.Start(cancelled), context.Canceled, "a done ctx starts nothing")

	require.NoError(t, w.Start(context.Background()))
	t.Cleanup(w.Shutdown)
	require.ErrorContains(t, w.Start(context.Background()), "called twice")
	require.ErrorContains(t, w.Run(context.Background()), "called twice")
	require.ErrorContains(t, w.Handle("x:y", asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil })), "after Run or Start")

	b.enqueue(validateTask(t, "crm+acme"))
	eventually(t, 10*time.Second, func() bool { return b.get("crm+acme").State == state.Callable }, "processed after Start")

	w.Shutdown()
	require.False(t, w.startExchange(), "no exchange starts after Shutdown")
	select {
	case <-w.stopped:
	default:
		t.Fatal("Shutdown returned before handlers were told to stop waiting")
	}
	w.Shutdown() // idempotent
	require.Error(t, w.Start(context.Background()), "a Worker runs once")
}

// TestShutdownWithoutStart: Shutdown of a Worker never started returns at
// once and leaves it unable to start.
func TestShutdownWithoutStart(t *testing.T) {
	leakCheck(t)
	b := setup(t)
	w := b.worker()
	done := make(chan struct{})
	go func() { w.Shutdown(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown without Start blocked")
	}
	require.False(t, w.startExchange())
	require.ErrorContains(t, w.Start(context.Background()), "after Shutdown")
}
