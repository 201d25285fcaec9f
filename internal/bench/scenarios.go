package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/procstat"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
	"github.com/vaultfleet/vaultfleet/worker"
)

// pollInterval is the asynq poll interval of the throughput runs, for the
// no-op server and the worker alike.
const pollInterval = 100 * time.Millisecond

// stallTimeout ends a run that makes no progress for this long.
const stallTimeout = 2 * time.Minute

// taskRun is one timed run of a server over a queued backlog.
type taskRun struct {
	n        int
	elapsed  time.Duration
	procCPU  time.Duration
	redisCPU time.Duration
	commands int64
	byName   map[string]int64
	trips    int64
	peakRSS  uint64
	idleRSS  uint64
}

func (r taskRun) rate() float64               { return float64(r.n) / r.elapsed.Seconds() }
func (r taskRun) per(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(r.n) }
func (r taskRun) perCount(c int64) float64    { return float64(c) / float64(r.n) }
func mib(b uint64) float64                    { return float64(b) / (1 << 20) }
func (e *env) asynqClient() *asynq.Client     { return asynq.NewClientFromRedisClient(e.rdb) }
func (e *env) inspector() *asynq.Inspector    { return asynq.NewInspectorFromRedisClient(e.rdb) }
func noopHandler(count func()) asynq.Handler {
	return asynq.HandlerFunc(func(context.Context, *asynq.Task) error { count(); return nil })
}
func validateTask(pop, conn string, i int, reason tasks.Reason, key string) (*asynq.Task, error) {
	return tasks.NewValidateTask(consumerID(pop, i), conn, reason, key)
}

// enqueueValidations queues one validation of each of the n connections
// of pop, from 16 goroutines.
func (e *env) enqueueValidations(ctx context.Context, pop, conn string, n int, reason tasks.Reason, key string) error {
	client := e.asynqClient()
	return forEach(ctx, n, 16, func(i int) error {
		t, err := validateTask(pop, conn, i, reason, key)
		if err != nil {
			return err
		}
		_, err = client.EnqueueContext(ctx, t)
		return err
	})
}

// enqueueBatches queues periodic checks of the n connections of pop as
// connection:validate_batch tasks of size members, all due at due, as the
// scheduler would; it returns how many tasks it queued.
func (e *env) enqueueBatches(ctx context.Context, pop, conn string, n, size int, due time.Time) (int, error) {
	client := e.asynqClient()
	_, svc, _ := state.SplitConnectionID(conn)
	nb := (n + size - 1) / size
	err := forEach(ctx, nb, 16, func(b int) error {
		members := make([]tasks.BatchMember, 0, size)
		for i := b * size; i < min(n, (b+1)*size); i++ {
			members = append(members, tasks.BatchMember{ConsumerID: consumerID(pop, i), ConnectionID: conn, Due: due.Unix()})
		}
		t, err := tasks.NewValidateBatchTask(svc, members)
		if err != nil {
			return err
		}
		_, err = client.EnqueueContext(ctx, t)
		return err
	})
	return nb, err
}

// measure starts a server with run and times it until processed reaches
// n: elapsed time, this process's CPU, Redis CPU and commands, the bench
// client's round trips, and the process's peak RSS.
func (e *env) measure(ctx context.Context, scenario string, n int, run func(context.Context) error, processed func() int) (taskRun, error) {
	r := taskRun{n: n}
	settle()
	debug.FreeOSMemory()
	r.idleRSS = procstat.RSS()
	s0, err := snapshot(ctx, e.rdb)
	if err != nil {
		return r, err
	}
	rt0, cpu0 := e.rt.n.Load(), procstat.CPU()
	stopRSS := procstat.Sample(50 * time.Millisecond)
	stopProfile := e.profile(scenario)
	defer stopProfile()
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- run(rctx) }()
	last, lastAt := 0, time.Now()
	for {
		p := processed()
		if p >= n {
			break
		}
		if p != last {
			last, lastAt = p, time.Now()
		}
		var err error
		switch {
		case ctx.Err() != nil:
			err = ctx.Err()
		case time.Since(lastAt) > stallTimeout:
			err = fmt.Errorf("no progress for %s at %d of %d tasks", stallTimeout, p, n)
		}
		select {
		case rerr := <-done:
			err = fmt.Errorf("server stopped at %d of %d tasks: %v", p, n, rerr)
		default:
		}
		if err != nil {
			cancel()
			stopRSS()
			return r, err
		}
		time.Sleep(10 * time.Millisecond)
	}
	r.elapsed = time.Since(start)
	stopProfile()
	r.procCPU = procstat.CPU() - cpu0
	r.trips = e.rt.n.Load() - rt0
	r.peakRSS = stopRSS().RSS
	s1, err := snapshot(ctx, e.rdb)
	cancel()
	if rerr := <-done; err == nil {
		err = rerr
	}
	r.redisCPU, r.commands = s1.cpu-s0.cpu, s1.commands-s0.commands
	r.byName = commandDeltas(s0, s1)
	return r, err
}

// runNoop processes the queued backlog of n tasks with a no-op asynq
// handler at concurrency c.
func (e *env) runNoop(ctx context.Context, n, c int) (taskRun, error) {
	const scenario = ScenarioNoop
	var mu sync.Mutex
	count := 0
	srv := asynq.NewServerFromRedisClient(e.rdb, asynq.Config{Concurrency: c, Queues: tasks.Queues(),
		TaskCheckInterval: pollInterval, DelayedTaskCheckInterval: pollInterval, LogLevel: asynq.ErrorLevel})
	run := func(ctx context.Context) error {
		if err := srv.Start(noopHandler(func() { mu.Lock(); count++; mu.Unlock() })); err != nil {
			return err
		}
		<-ctx.Done()
		srv.Shutdown()
		return nil
	}
	return e.measure(ctx, scenario, n, run, func() int { mu.Lock(); defer mu.Unlock(); return count })
}

// newWorker builds a worker as production does, at concurrency c, with
// its metrics in reg.
func (e *env) newWorker(st *state.Store, cat *catalog.Catalog, c int, poll time.Duration, reg *prometheus.Registry) (*worker.Worker, error) {
	return worker.New(worker.Config{Store: st, Catalog: cat, Redis: e.rdb, Concurrency: c, PollInterval: poll,
		Getenv: benchGetenv, Logger: e.log, Registerer: reg})
}

// processedBy counts the tasks a worker finished, by outcome.
func processedBy(reg *prometheus.Registry) map[string]int {
	out := map[string]int{}
	mfs, err := reg.Gather()
	if err != nil {
		return out
	}
	for _, mf := range mfs {
		if mf.GetName() != "vaultfleet_tasks_processed_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" {
					out[l.GetValue()] += int(m.GetCounter().GetValue())
				}
			}
		}
	}
	return out
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// runWorker processes the queued backlog of n validations with the real
// worker at concurrency c and fails unless every one succeeded.
func (e *env) runWorker(ctx context.Context, scenario string, st *state.Store, cat *catalog.Catalog, n, c int) (taskRun, error) {
	return e.runWorkerChecks(ctx, scenario, st, cat, n, n, c)
}

// runWorkerChecks processes a queued backlog of nTasks tasks holding
// nChecks checks with the real worker at concurrency c, timed until every
// check ran (the per-unit figures are per check), and fails unless every
// task succeeded.
func (e *env) runWorkerChecks(ctx context.Context, scenario string, st *state.Store, cat *catalog.Catalog, nChecks, nTasks, c int) (taskRun, error) {
	reg := prometheus.NewRegistry()
	w, err := e.newWorker(st, cat, c, pollInterval, reg)
	if err != nil {
		return taskRun{}, err
	}
	done := func() int { return total(processedBy(reg)) }
	if nChecks != nTasks {
		// One Gather per poll (every 10 ms): the bench's own allocations
		// count in the process's CPU and RSS.
		done = func() int {
			tasks, checks := tasksAndChecks(reg)
			if tasks < nTasks {
				return min(checks, nChecks-1)
			}
			return checks
		}
	}
	r, err := e.measure(ctx, scenario, nChecks, w.Run, done)
	if err != nil {
		return r, err
	}
	if by := processedBy(reg); by["success"] != nTasks {
		return r, fmt.Errorf("the worker processed %d tasks, %d of them successfully (%v): the provider or Redis failed", total(by), by["success"], by)
	}
	if _, n := tasksAndChecks(reg); n != nChecks {
		return r, fmt.Errorf("the worker made %d checks, want %d", n, nChecks)
	}
	return r, nil
}

// tasksAndChecks counts the tasks a worker finished and the checks it made
// (every outcome), from one Gather.
func tasksAndChecks(reg *prometheus.Registry) (tasks, checks int) {
	mfs, err := reg.Gather()
	if err != nil {
		return 0, 0
	}
	for _, mf := range mfs {
		switch mf.GetName() {
		case "vaultfleet_tasks_processed_total":
			for _, m := range mf.GetMetric() {
				tasks += int(m.GetCounter().GetValue())
			}
		case "vaultfleet_checks_total":
			for _, m := range mf.GetMetric() {
				checks += int(m.GetCounter().GetValue())
			}
		}
	}
	return tasks, checks
}

type throughput struct{ noop, validate, revalidate, revalidateSingle taskRun }

// throughputScenarios: no-op ceiling, first validation, periodic
// revalidation and the slow provider, on --tasks API-key connections.
func (e *env) throughputScenarios(ctx context.Context) error {
	o := e.o
	p := newProvider(o.TokenLifetime)
	defer p.Close()
	cat, err := benchCatalog(p.host, o.CheckInterval, o.TokenLifetime, o.RefreshWindow)
	if err != nil {
		return fmt.Errorf("bench catalog: %w", err)
	}
	st, err := newStore(e.rdb, cat, "vfb", nil)
	if err != nil {
		return err
	}
	n, c := o.Tasks, o.Concurrency
	e.logf("storing %d API-key connections", n)
	if err := seedKeys(ctx, st, "k", n); err != nil {
		return fmt.Errorf("store connections: %w", err)
	}
	tp := &throughput{}
	var noops []taskRun
	noop := func(key string) error {
		if err := e.enqueueValidations(ctx, "k", keyConn, n, tasks.ReasonScheduled, key); err != nil {
			return err
		}
		e.logf("no-op asynq handler: %d tasks at concurrency %d", n, c)
		r, err := e.runNoop(ctx, n, c)
		if err != nil {
			return fmt.Errorf("no-op run: %w", err)
		}
		noops = append(noops, r)
		return nil
	}
	if o.has(ScenarioNoop) {
		if err := noop("noop1"); err != nil {
			return err
		}
	}
	callable := func() error {
		for _, i := range []int{0, n / 2, n - 1} {
			got, err := st.Get(ctx, state.Ref{ConsumerID: consumerID("k", i), ConnectionID: keyConn})
			if err != nil {
				return err
			}
			if got.State != state.Callable {
				return fmt.Errorf("connection %d is %s after its validation, want callable", i, got.State)
			}
		}
		return nil
	}
	// A first validation takes every connection from added to callable;
	// the periodic revalidation needs them callable, so it validates them
	// first even when the validate scenario is not selected.
	if o.has(ScenarioValidate) || o.has(ScenarioRevalidate) || o.has(ScenarioSlow) {
		if err := e.enqueueValidations(ctx, "k", keyConn, n, tasks.ReasonOnDemand, "first"); err != nil {
			return err
		}
		e.logf("first validation: %d tasks at concurrency %d", n, c)
		r, err := e.runWorker(ctx, ScenarioValidate, st, cat, n, c)
		if err != nil {
			return fmt.Errorf("first validation: %w", err)
		}
		if err := callable(); err != nil {
			return err
		}
		tp.validate = r
	}
	if o.has(ScenarioRevalidate) {
		// As the scheduler enqueues them: batches of --check-batch
		// (judged), and, for comparison, one task per check.
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
		nb, err := e.enqueueBatches(ctx, "k", keyConn, n, o.CheckBatch, time.Now())
		if err != nil {
			return err
		}
		e.logf("periodic revalidation: %d checks in %d batches at concurrency %d", n, nb, c)
		r, err := e.runWorkerChecks(ctx, ScenarioRevalidate, st, cat, n, nb, c)
		if err != nil {
			return fmt.Errorf("periodic revalidation: %w", err)
		}
		if err := callable(); err != nil {
			return err
		}
		tp.revalidate = r
		if err := e.enqueueValidations(ctx, "k", keyConn, n, tasks.ReasonScheduled, "periodic"); err != nil {
			return err
		}
		e.logf("periodic revalidation, one task per check: %d tasks at concurrency %d", n, c)
		if r, err = e.runWorker(ctx, ScenarioRevalidate+"-single", st, cat, n, c); err != nil {
			return fmt.Errorf("periodic revalidation, one task per check: %w", err)
		}
		tp.revalidateSingle = r
	}
	// The ceiling again after the worker runs: the machine's load may have
	// moved meanwhile; the baseline is the mean of both.
	if o.has(ScenarioNoop) && (o.has(ScenarioValidate) || o.has(ScenarioRevalidate)) {
		if err := noop("noop2"); err != nil {
			return err
		}
	}
	if len(noops) > 0 {
		tp.noop = meanRun(noops)
	}
	e.throughputRows(tp, noops)

	if o.has(ScenarioSlow) {
		if err := e.slowScenario(ctx, p, st, cat); err != nil {
			return err
		}
	}
	if e.owned {
		return e.rdb.FlushAll(ctx).Err()
	}
	return deletePrefix(ctx, e.rdb, "vfb:")
}

func meanRun(rs []taskRun) taskRun {
	var m taskRun
	for _, r := range rs {
		m.n += r.n
		m.elapsed += r.elapsed
		m.procCPU += r.procCPU
		m.redisCPU += r.redisCPU
		m.commands += r.commands
		m.trips += r.trips
		if m.byName == nil {
			m.byName = map[string]int64{}
		}
		for k, v := range r.byName {
			m.byName[k] += v
		}
		m.peakRSS = max(m.peakRSS, r.peakRSS)
	}
	return m
}

func (e *env) throughputRows(tp *throughput, noops []taskRun) {
	r, o := e.report, e.o
	c := strconv.Itoa(o.Concurrency)
	hasNoop := len(noops) > 0
	if hasNoop {
		rates := make([]string, len(noops))
		for i, n := range noops {
			rates[i] = thousands(int64(n.rate()))
		}
		r.add(Row{Scenario: "no-op ceiling c=" + c, What: "tasks/s", Value: tp.noop.rate(), Unit: "/s",
			BaselineWhat: "before/after: " + strings.Join(rates, " / ")})
		r.add(Row{Scenario: "no-op ceiling c=" + c, What: "process CPU per task", Value: tp.noop.per(tp.noop.procCPU), Unit: "µs"})
		r.add(Row{Scenario: "no-op ceiling c=" + c, What: "Redis CPU per task", Value: tp.noop.per(tp.noop.redisCPU), Unit: "µs"})
		r.add(Row{Scenario: "no-op ceiling c=" + c, What: "Redis round trips per task", Value: tp.noop.perCount(tp.noop.trips), Unit: ""})
		r.add(Row{Scenario: "no-op ceiling c=" + c, What: "Redis commands per task", Value: tp.noop.perCount(tp.noop.commands), Unit: ""})
	}
	base := func(v float64) float64 {
		if !hasNoop {
			return 0
		}
		return v
	}
	add := func(name, unit string, run taskRun, rateGoal float64, cpuGoal float64) {
		if run.n == 0 {
			return
		}
		rate := Row{Scenario: name + " c=" + c, What: unit + "s/s", Value: run.rate(), Unit: "/s",
			Baseline: base(tp.noop.rate()), BaselineWhat: "no-op",
			Goal: fmt.Sprintf("≥ %.1f × no-op", rateGoal)}
		rate.Pass = hasNoop && run.rate() >= rateGoal*tp.noop.rate()
		if !hasNoop || rateGoal == 0 {
			rate.Goal, rate.Pass = "", false
		}
		r.add(rate)
		r.add(Row{Scenario: name + " c=" + c, What: "process CPU per " + unit, Value: run.per(run.procCPU), Unit: "µs",
			Baseline: base(tp.noop.per(tp.noop.procCPU)), BaselineWhat: "no-op"})
		cpu := Row{Scenario: name + " c=" + c, What: "Redis CPU per " + unit, Value: run.per(run.redisCPU), Unit: "µs",
			Baseline: base(tp.noop.per(tp.noop.redisCPU)), BaselineWhat: "no-op"}
		if cpuGoal > 0 {
			cpu.Goal, cpu.Pass = fmt.Sprintf("≤ %.0f µs", cpuGoal), run.per(run.redisCPU) <= cpuGoal
		}
		r.add(cpu)
		r.add(Row{Scenario: name + " c=" + c, What: "Redis round trips per " + unit, Value: run.perCount(run.trips), Unit: "",
			Baseline: base(tp.noop.perCount(tp.noop.trips)), BaselineWhat: "no-op"})
		r.add(Row{Scenario: name + " c=" + c, What: "Redis commands per " + unit, Value: run.perCount(run.commands), Unit: "",
			Baseline: base(tp.noop.perCount(tp.noop.commands)), BaselineWhat: "no-op"})
	}
	if e.o.has(ScenarioValidate) {
		add("first validation", "task", tp.validate, 0.6, 0)
		r.note("first validation, Redis commands per task: %s", perCommand(tp.validate, tp.noop, hasNoop))
	}
	if e.o.has(ScenarioRevalidate) {
		add(fmt.Sprintf("periodic revalidation, batches of %d", e.o.CheckBatch), "check", tp.revalidate, 1.0, 25)
		r.note("periodic revalidation (batches of %d), Redis commands per check: %s", e.o.CheckBatch, perCommand(tp.revalidate, tp.noop, hasNoop))
		add("periodic revalidation, 1 task per check", "check", tp.revalidateSingle, 0, 0)
		r.note("periodic revalidation (1 task per check), Redis commands per check: %s", perCommand(tp.revalidateSingle, tp.noop, hasNoop))
	}
	if hasNoop {
		r.note("no-op ceiling, Redis commands per task: %s", perCommand(tp.noop, taskRun{}, false))
	}
	if hasNoop {
		r.note("process CPU is this whole process (asynq, worker, the httptest provider, the bench's polling), from getrusage; Redis CPU from INFO cpu; round trips are the bench's Redis client's requests (a pipeline or a Lua call is one); commands from INFO commandstats, those run inside Lua scripts included.")
	}
}

// slowScenario: the worker at --slow-concurrency against a provider that
// answers after --slow-latency: throughput beside C/latency and peak RSS,
// for periodic checks in batches as the scheduler enqueues them (judged)
// and for one task per check.
func (e *env) slowScenario(ctx context.Context, p *provider, st *state.Store, cat *catalog.Catalog) error {
	o := e.o
	n, c := o.Tasks, o.SlowConcurrency
	p.latency.Store(int64(o.SlowLatency))
	defer p.latency.Store(0)
	ideal := float64(c) / o.SlowLatency.Seconds()
	// Batches small enough that every worker slot has one: n/c members.
	size := max(1, min(o.CheckBatch, n/c))
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	nb, err := e.enqueueBatches(ctx, "k", keyConn, n, size, time.Now())
	if err != nil {
		return err
	}
	e.logf("slow provider: %d checks in %d batches at concurrency %d, %s per check", n, nb, c, o.SlowLatency)
	rb, err := e.runWorkerChecks(ctx, ScenarioSlow, st, cat, n, nb, c)
	if err != nil {
		return fmt.Errorf("slow provider, batches: %w", err)
	}
	name := fmt.Sprintf("slow provider c=%d, %s, batches of %d", c, o.SlowLatency, size)
	e.report.add(Row{Scenario: name, What: "checks/s", Value: rb.rate(), Unit: "/s", Baseline: ideal, BaselineWhat: "C/latency",
		Goal: "≥ 0.9 × C/latency", Pass: rb.rate() >= 0.9*ideal})
	e.report.add(Row{Scenario: name, What: "peak process RSS", Value: mib(rb.peakRSS), Unit: "MiB",
		Baseline: mib(rb.idleRSS), BaselineWhat: "idle before", Goal: "< 64 MiB", Pass: mib(rb.peakRSS) < 64})

	if err := e.enqueueValidations(ctx, "k", keyConn, n, tasks.ReasonScheduled, "slow"); err != nil {
		return err
	}
	e.logf("slow provider: %d tasks at concurrency %d, %s per check", n, c, o.SlowLatency)
	r, err := e.runWorker(ctx, ScenarioSlow+"-single", st, cat, n, c)
	if err != nil {
		return fmt.Errorf("slow provider: %w", err)
	}
	name = fmt.Sprintf("slow provider c=%d, %s, 1 task per check", c, o.SlowLatency)
	e.report.add(Row{Scenario: name, What: "checks/s", Value: r.rate(), Unit: "/s", Baseline: ideal, BaselineWhat: "C/latency"})
	e.report.add(Row{Scenario: name, What: "peak process RSS", Value: mib(r.peakRSS), Unit: "MiB",
		Baseline: mib(r.idleRSS), BaselineWhat: "idle before", Goal: "< 64 MiB", Pass: mib(r.peakRSS) < 64})
	e.report.note("peak RSS is the whole bench process (worker, the httptest provider, the bench's Redis client), so an upper bound for a worker.")
	return nil
}

// memoryAndSweep stores --memory-connections OAuth connections (200-char
// access token) and measures Redis bytes per connection, then has the
// scheduler claim and enqueue every one of them beside raw enqueues.
func (e *env) memoryAndSweep(ctx context.Context) error {
	o := e.o
	m := o.MemoryConnections
	p := newProvider(o.TokenLifetime)
	defer p.Close()
	cat, err := benchCatalog(p.host, o.CheckInterval, o.TokenLifetime, o.RefreshWindow)
	if err != nil {
		return err
	}
	st, err := newStore(e.rdb, cat, "vfm", nil)
	if err != nil {
		return err
	}
	e.logf("storing %d OAuth connections", m)
	s0, err := stableMemory(ctx, e.rdb)
	if err != nil {
		return err
	}
	now := time.Now()
	start := time.Now()
	stopProfile := e.profile(ScenarioMemory)
	// Tokens expire in 3h: none is due for refresh during the sweep.
	if err := seedOAuth(ctx, st, "m", oauthConn, m, true, func(int) time.Time { return now.Add(3 * time.Hour) }); err != nil {
		return fmt.Errorf("store OAuth connections: %w", err)
	}
	seedTime := time.Since(start)
	stopProfile()
	s1, err := snapshot(ctx, e.rdb)
	if err != nil {
		return err
	}
	stream, err := e.rdb.MemoryUsage(ctx, "vfm:events", 0).Result()
	if err != nil {
		return fmt.Errorf("MEMORY USAGE of the event stream: %w", err)
	}
	perConn := float64(s1.memory-s0.memory-stream) / float64(m)
	if o.has(ScenarioMemory) {
		e.report.add(Row{Scenario: fmt.Sprintf("memory, %s OAuth connections", thousands(int64(m))), What: "Redis bytes per connection",
			Value: perConn, Unit: "B", BaselineWhat: "record, indexes, due entries", Goal: "≤ 768 B", Pass: perConn <= 768})
		e.report.note("memory: used_memory growth (less client, AOF and replication buffers) while storing the connections (200-char access token, 100-char refresh token, expiry, instance_url; each marked valid), less the capped event stream (%.1f MiB); stored at %.0f puts+verdicts/s.",
			mib(uint64(stream)), float64(m)/seedTime.Seconds())
		if m < 100_000 {
			e.report.note("memory: %d connections is too few to judge the goal by: below about 128 per shard the index zsets stay in the compact listpack encoding, and fixed costs weigh more; the goal is set at 1,000,000 (--memory-connections).", m)
		}
	}
	if o.has(ScenarioSweep) {
		if err := e.sweep(ctx, st, cat, m); err != nil {
			return err
		}
	}
	if e.owned {
		return e.rdb.FlushAll(ctx).Err()
	}
	return deletePrefix(ctx, e.rdb, "vfm:")
}

// sweep: one scheduler whose clock is 2h ahead claims and enqueues every
// stored connection (all due for a check); raw Client.Enqueue of the same
// kind of task (tasks.NewValidateTask: the same TaskID option, another
// key) with the same 16 goroutines runs half before and half after it.
func (e *env) sweep(ctx context.Context, st *state.Store, cat *catalog.Catalog, m int) error {
	const par = scheduler.DefaultEnqueueConcurrency
	client := e.asynqClient()
	// sweeper is a scheduler whose clock is at, enqueueing batch checks
	// per task.
	sweeper := func(at time.Time, batch int) (*scheduler.Scheduler, error) {
		return scheduler.New(scheduler.Config{Store: st, Catalog: cat, Client: client, EnqueueConcurrency: par,
			MaxLowPending: -1, NowFunc: func() time.Time { return at }, CheckBatch: batch})
	}
	clock := time.Now().Add(2 * time.Hour)
	s, err := sweeper(clock, 1)
	if err != nil {
		return err
	}
	var rawSpent spent
	raw := func(from, to int) error {
		sp, err := e.redisTimed(ctx, func() error {
			return forEach(ctx, to-from, par, func(i int) error {
				t, err := validateTask("m", oauthConn, from+i, tasks.ReasonScheduled, "raw")
				if err != nil {
					return err
				}
				_, err = client.EnqueueContext(ctx, t)
				return err
			})
		})
		rawSpent.add(sp)
		return err
	}
	e.logf("sweep: %d due connections, raw enqueue beside it", m)
	if err := raw(0, m/2); err != nil {
		return fmt.Errorf("raw enqueue: %w", err)
	}
	sweepSpent, err := e.redisTimed(ctx, func() error {
		defer e.profile(ScenarioSweep)()
		return s.Sweep(ctx)
	})
	if err != nil {
		return fmt.Errorf("sweep: %w", err)
	}
	if err := raw(m/2, m); err != nil {
		return fmt.Errorf("raw enqueue: %w", err)
	}
	insp := e.inspector()
	qi, err := insp.GetQueueInfo(tasks.QueueLow)
	if err != nil {
		return err
	}
	if qi.Pending != 2*m {
		return fmt.Errorf("sweep: the low queue holds %d tasks, want %d (each connection once by the sweep, once raw)", qi.Pending, 2*m)
	}

	// The same connections due again, swept as production does: batches.
	bs, err := sweeper(clock.Add(4*time.Hour), e.o.CheckBatch)
	if err != nil {
		return err
	}
	e.logf("sweep in batches of %d: %d due connections", e.o.CheckBatch, m)
	batchSpent, err := e.redisTimed(ctx, func() error { return bs.Sweep(ctx) })
	if err != nil {
		return fmt.Errorf("batched sweep: %w", err)
	}
	qb, err := insp.GetQueueInfo(tasks.QueueLow)
	if err != nil {
		return err
	}
	batches := qb.Pending - qi.Pending
	if batches < m/e.o.CheckBatch {
		return fmt.Errorf("batched sweep: %d tasks for %d connections in batches of %d", batches, m, e.o.CheckBatch)
	}
	// A Redis the bench started is flushed next, at once; deleting
	// millions of tasks one script call at a time would take longer.
	if !e.owned {
		if _, err := insp.DeleteAllPendingTasks(tasks.QueueLow); err != nil {
			return err
		}
	}
	rate, rawRate := float64(m)/sweepSpent.elapsed.Seconds(), float64(m)/rawSpent.elapsed.Seconds()
	perClaim := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(m) }
	name := fmt.Sprintf("sweep, %s due connections", thousands(int64(m)))
	e.report.add(Row{Scenario: name, What: "claims+enqueues/s", Value: rate, Unit: "/s", Baseline: rawRate,
		BaselineWhat: fmt.Sprintf("raw Enqueue, %d goroutines", par), Goal: "≥ 0.85 × raw", Pass: rate >= 0.85*rawRate})
	e.report.add(Row{Scenario: name, What: "Redis CPU per claim", Value: perClaim(sweepSpent.cpu), Unit: "µs",
		Baseline: perClaim(rawSpent.cpu), BaselineWhat: "raw Enqueue"})
	bname := fmt.Sprintf("sweep in batches of %d, %s due", e.o.CheckBatch, thousands(int64(m)))
	e.report.add(Row{Scenario: bname, What: "claims/s", Value: float64(m) / batchSpent.elapsed.Seconds(), Unit: "/s", Baseline: rawRate,
		BaselineWhat: "raw Enqueue, 1 task per check"})
	e.report.add(Row{Scenario: bname, What: "Redis CPU per claim", Value: perClaim(batchSpent.cpu), Unit: "µs",
		Baseline: perClaim(rawSpent.cpu), BaselineWhat: "raw Enqueue"})
	e.report.note("sweep (1 task per claim), Redis commands per claim: %s", perCommandVs(taskRun{n: m, byName: sweepSpent.cmds}, taskRun{n: m, byName: rawSpent.cmds}, true, "raw"))
	e.report.note("sweep: the judged row enqueues one connection:validate per claim (--check-batch 1), the same task ids as the raw baseline; the batched row is the same connections due again, swept as production does (%d tasks for %d claims).", batches, m)
	return nil
}

// freshness tracks, at the provider, how late checks come after their due
// time and whether tokens expired before their refresh.
type freshness struct {
	mu       sync.Mutex
	start    time.Time // when measuring started
	expiry   []time.Time
	gen      []int
	due      map[int]time.Time
	lags     []time.Duration
	late     int // refreshes that came after the token had expired
	lateUse  int // checks sent with an expired token
	checks   int
	refresh  int
	unclaim  int // checks without a recorded claim (not scheduled ones)
	measured bool
}

func newFreshness(n int) *freshness {
	return &freshness{expiry: make([]time.Time, n), gen: make([]int, n), due: map[int]time.Time{}}
}

func (f *freshness) setExpiry(i int, t time.Time) {
	f.mu.Lock()
	f.expiry[i] = t
	f.mu.Unlock()
}

func (f *freshness) claimed(i int, due time.Time) {
	f.mu.Lock()
	f.due[i] = due
	f.mu.Unlock()
}

func (f *freshness) checked(i int, now time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i < 0 || i >= len(f.expiry) {
		return
	}
	due, ok := f.due[i]
	delete(f.due, i)
	if !f.measured {
		return
	}
	f.checks++
	if !ok {
		f.unclaim++
	} else {
		f.lags = append(f.lags, now.Sub(due))
	}
	if now.After(f.expiry[i]) {
		f.lateUse++
	}
}

func (f *freshness) refreshed(i int, now, expiry time.Time) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i < 0 || i >= len(f.expiry) {
		return 0
	}
	if f.measured {
		f.refresh++
		if now.After(f.expiry[i]) {
			f.late++
		}
	}
	f.expiry[i] = expiry
	f.gen[i]++
	return f.gen[i]
}

// claimRecorder is the scheduler's store: the real one, noting the due
// time of every check it claims.
type claimRecorder struct {
	*state.Store
	f *freshness
}

func (c claimRecorder) ClaimDue(ctx context.Context, idx state.Index, shard int, now time.Time, lease time.Duration, max int) ([]state.Claim, error) {
	claims, err := c.Store.ClaimDue(ctx, idx, shard, now, lease, max)
	if idx == state.IndexCheck {
		for _, cl := range claims {
			if i, err := strconv.Atoi(strings.TrimPrefix(cl.Ref.ConsumerID, "f-")); err == nil {
				c.f.claimed(i, cl.Due)
			}
		}
	}
	return claims, err
}

// freshnessScenario: --connections OAuth connections on a compressed
// schedule, with a scheduler and a worker running as in production, for
// --duration after they are stored.
func (e *env) freshnessScenario(ctx context.Context) error {
	o := e.o
	n := o.Connections
	p := newProvider(o.TokenLifetime)
	defer p.Close()
	cat, err := benchCatalog(p.host, o.CheckInterval, o.TokenLifetime, o.RefreshWindow)
	if err != nil {
		return err
	}
	f := newFreshness(n)
	p.fresh.Store(f)
	st, err := newStore(e.rdb, cat, "vff", nil)
	if err != nil {
		return err
	}
	// A seeded connection's next check is due one check interval (with its
	// fixed jitter, state.NextCheckAt) after its verdict is written. The
	// seeding store's clock is set back by that interval, forward by a
	// random part of it, so that checks come due spread over one interval
	// from now rather than all at once.
	seedStore, err := newStore(e.rdb, cat, "vff", func() time.Time {
		return time.Now().Add(-o.CheckInterval + rand.N(o.CheckInterval))
	})
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	w, err := e.newWorker(st, cat, o.Concurrency, 0, reg)
	if err != nil {
		return err
	}
	s, err := scheduler.New(scheduler.Config{Store: claimRecorder{st, f}, Catalog: cat, Client: e.asynqClient(),
		Inspector: e.inspector(), Logger: e.log})
	if err != nil {
		return err
	}
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() { errs <- w.Run(fctx) })
	wg.Go(func() { errs <- s.Run(fctx) })

	e.logf("freshness: storing %d OAuth connections while a scheduler and a worker (c=%d) run", n, o.Concurrency)
	start := time.Now()
	// Tokens expire at random over one lifetime: their refreshes come due
	// spread over one lifetime. The store takes the token's issue time
	// from its (shifted) clock and refreshes a token half its lifetime
	// ahead at most, so each expiry leaves at least two refresh windows
	// after the latest issue time the shifted clock can give.
	// (The shifted clock is never ahead of the real one.)
	earliest := 2 * o.RefreshWindow
	err = seedOAuth(ctx, seedStore, "f", freshConn, n, false, func(i int) time.Time {
		t := time.Now().Add(earliest + rand.N(o.TokenLifetime))
		f.setExpiry(i, t)
		return t
	})
	if err != nil {
		stop()
		wg.Wait()
		return fmt.Errorf("store connections: %w", err)
	}
	seedTime := time.Since(start)
	f.mu.Lock()
	f.start, f.measured = time.Now(), true
	f.mu.Unlock()
	e.logf("freshness: running for %s", o.Duration)
	cpu0 := procstat.CPU()
	stopProfile := e.profile(ScenarioFreshness)
	defer stopProfile()
	r0, err := snapshot(ctx, e.rdb)
	if err != nil {
		stop()
		wg.Wait()
		return err
	}
	stoppedEarly := false
	var early error
	select {
	case <-ctx.Done():
	case <-time.After(o.Duration):
	case early = <-errs:
		// The worker and the scheduler run until stopped.
		stoppedEarly = true
	}
	end := time.Now()
	stopProfile()
	cpu := procstat.CPU() - cpu0
	r1, serr := snapshot(ctx, e.rdb)
	stop()
	wg.Wait()
	close(errs)
	if stoppedEarly {
		return fmt.Errorf("freshness: the worker or the scheduler stopped before the end of the run: %v", early)
	}
	for err := range errs {
		if err != nil {
			return fmt.Errorf("freshness: %w", err)
		}
	}
	if serr != nil {
		return serr
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	stale := 0
	for _, t := range f.expiry {
		if t.Before(end) {
			stale++
		}
	}
	slices.Sort(f.lags)
	pct := func(q float64) float64 {
		if len(f.lags) == 0 {
			return 0
		}
		return f.lags[min(len(f.lags)-1, int(q*float64(len(f.lags))))].Seconds()
	}
	window := end.Sub(f.start)
	name := fmt.Sprintf("freshness, %s conns, %s checks, %s tokens", thousands(int64(n)), o.CheckInterval, o.TokenLifetime)
	wantChecks := float64(n) * window.Seconds() / o.CheckInterval.Seconds()
	r := e.report
	r.add(Row{Scenario: name, What: "checks done", Value: float64(f.checks), Unit: "", Baseline: wantChecks,
		BaselineWhat: "N × run / interval"})
	r.add(Row{Scenario: name, What: "check lag behind due, p50", Value: pct(0.50), Unit: "s",
		Baseline: 0, BaselineWhat: fmt.Sprintf("%d scheduled checks", len(f.lags))})
	r.add(Row{Scenario: name, What: "check lag behind due, p99", Value: pct(0.99), Unit: "s"})
	r.add(Row{Scenario: name, What: "tokens expired before refresh", Value: float64(f.late), Unit: "",
		Baseline: float64(f.refresh), BaselineWhat: "refreshes", Goal: "0", Pass: f.late == 0})
	r.add(Row{Scenario: name, What: "tokens expired at the end", Value: float64(stale), Unit: "", Goal: "0", Pass: stale == 0})
	r.add(Row{Scenario: name, What: "checks sent with an expired token", Value: float64(f.lateUse), Unit: "", Goal: "0", Pass: f.lateUse == 0})
	tasksDone := f.checks + f.refresh
	if tasksDone > 0 {
		r.add(Row{Scenario: name, What: "process CPU per check or refresh", Value: float64(cpu.Microseconds()) / float64(tasksDone), Unit: "µs"})
		r.add(Row{Scenario: name, What: "Redis CPU per check or refresh", Value: float64((r1.cpu - r0.cpu).Microseconds()) / float64(tasksDone), Unit: "µs"})
	}
	r.note("freshness: the worker processed %v (by outcome); the provider answered %d checks and %d token requests in all; %d checks while measuring were not the scheduler's (no claim recorded).",
		processedBy(reg), p.checks.Load(), p.tokens.Load(), f.unclaim)
	r.note("freshness: connections stored in %s while the fleet ran (not measured), then measured for %s: lag is provider arrival minus the due time the scheduler claimed, for every scheduled check that arrived while measuring (a backlog left from the seeding counts); scheduler tick %s, worker poll 1s (the defaults).",
		seedTime.Round(time.Millisecond), window.Round(time.Millisecond), scheduler.DefaultTick)
	return nil
}

// perCommand lists the commands per task of run by name, most first, with
// the difference to the baseline's where there is one.
func perCommand(run, base taskRun, withBase bool) string {
	return perCommandVs(run, base, withBase, "no-op")
}

// perCommandVs is perCommand with the baseline named label.
func perCommandVs(run, base taskRun, withBase bool, label string) string {
	names := make([]string, 0, len(run.byName))
	for k := range run.byName {
		names = append(names, k)
	}
	slices.SortFunc(names, func(a, b string) int { return int(run.byName[b] - run.byName[a]) })
	parts := []string{}
	for _, k := range names {
		v := run.perCount(run.byName[k])
		if v < 0.05 {
			continue
		}
		s := fmt.Sprintf("%s %.2f", strings.ToLower(k), v)
		if withBase && base.n > 0 {
			s += fmt.Sprintf(" (%s %.2f)", label, base.perCount(base.byName[k]))
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// stableMemory takes a snapshot once used_memory holds still (within 4 KiB
// over 300 ms, for at most 10 s): what the previous scenario left behind
// (asynq's server and worker state expiring, a lazy free) must not count
// against the connections stored next.
func stableMemory(ctx context.Context, rdb redis.UniversalClient) (redisStats, error) {
	prev, err := snapshot(ctx, rdb)
	if err != nil {
		return prev, err
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		time.Sleep(300 * time.Millisecond)
		cur, err := snapshot(ctx, rdb)
		if err != nil {
			return cur, err
		}
		if d := cur.memory - prev.memory; d < 4<<10 && d > -4<<10 {
			return cur, nil
		}
		prev = cur
	}
	return prev, nil
}

// spent is what a timed section took: wall time, Redis CPU and Redis
// commands by name.
type spent struct {
	elapsed, cpu time.Duration
	cmds         map[string]int64
}

func (s *spent) add(o spent) {
	s.elapsed += o.elapsed
	s.cpu += o.cpu
	if s.cmds == nil {
		s.cmds = map[string]int64{}
	}
	for k, v := range o.cmds {
		s.cmds[k] += v
	}
}

// redisTimed runs f and says what it took, Redis snapshots taken just
// before and after it.
func (e *env) redisTimed(ctx context.Context, f func() error) (spent, error) {
	s0, err := snapshot(ctx, e.rdb)
	if err != nil {
		return spent{}, err
	}
	start := time.Now()
	err = f()
	elapsed := time.Since(start)
	s1, serr := snapshot(ctx, e.rdb)
	if err = errors.Join(err, serr); err != nil {
		return spent{}, err
	}
	return spent{elapsed: elapsed, cpu: s1.cpu - s0.cpu, cmds: commandDeltas(s0, s1)}, nil
}
