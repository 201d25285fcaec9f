// Package bench measures what a fleet costs: checks per second beside the
// no-op asynq ceiling, Redis round trips and CPU per check, Redis bytes per
// connection, the scheduler's sweep beside raw enqueues, freshness on a
// compressed schedule, and worker memory with a slow provider. Every figure
// is printed beside its baseline from the same run and their ratio, in one
// table, with the goals of issue 15. `vaultfleet bench` runs it.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Scenarios, in the order they run.
const (
	ScenarioNoop       = "noop"
	ScenarioValidate   = "validate"
	ScenarioRevalidate = "revalidate"
	ScenarioSlow       = "slow"
	ScenarioMemory     = "memory"
	ScenarioSweep      = "sweep"
	ScenarioFreshness  = "freshness"
)

// AllScenarios lists every scenario in run order.
var AllScenarios = []string{ScenarioNoop, ScenarioValidate, ScenarioRevalidate, ScenarioSlow,
	ScenarioMemory, ScenarioSweep, ScenarioFreshness}

// Options configures a run. Zero values take the defaults of Defaults.
type Options struct {
	// Connections is the population of the sweep and freshness scenarios.
	Connections int
	// MemoryConnections is the population of the memory scenario (the
	// sweep claims it). If zero, Connections.
	MemoryConnections int
	// Tasks is how many tasks each throughput scenario processes.
	Tasks int
	// Concurrency of the no-op, first validation and revalidation runs.
	Concurrency int
	// CheckBatch is the periodic checks per connection:validate_batch, as
	// the scheduler's --check-batch. If zero, scheduler.DefaultCheckBatch.
	CheckBatch int
	// SlowConcurrency and SlowLatency: the worker memory scenario.
	SlowConcurrency int
	SlowLatency     time.Duration
	// Duration of the freshness run, after its connections are stored.
	Duration time.Duration
	// CheckInterval, TokenLifetime and RefreshWindow: the compressed
	// schedule of the freshness scenario.
	CheckInterval time.Duration
	TokenLifetime time.Duration
	RefreshWindow time.Duration
	// Scenarios to run (names of AllScenarios); empty: all.
	Scenarios []string
	// RedisURL, if set, is used instead of a private redis-server. The
	// database must be empty unless ForceSharedDB.
	RedisURL      string
	ForceSharedDB bool
	// Log, if set, gets progress lines.
	Log io.Writer
	// Verbose sends the worker's and scheduler's logs to Log.
	Verbose bool
	// CPUProfile, if set, gets a CPU profile of the timed part of the
	// scenario ProfileScenario (default revalidate).
	CPUProfile      io.Writer
	ProfileScenario string
}

// Defaults returns the options of a full run.
func Defaults() Options {
	return Options{
		Connections:     100_000,
		Tasks:           20_000,
		Concurrency:     50,
		SlowConcurrency: 200,
		SlowLatency:     100 * time.Millisecond,
		Duration:        5 * time.Minute,
		CheckInterval:   60 * time.Second,
		TokenLifetime:   2 * time.Minute,
		RefreshWindow:   30 * time.Second,
	}
}

// Small returns the options of the CI run (--small): a few seconds each.
func Small() Options {
	return Options{
		Connections:     500,
		Tasks:           1_000,
		Concurrency:     50,
		SlowConcurrency: 200,
		SlowLatency:     100 * time.Millisecond,
		Duration:        6 * time.Second,
		CheckInterval:   2 * time.Second,
		TokenLifetime:   8 * time.Second,
		RefreshWindow:   3 * time.Second,
	}
}

func (o Options) withDefaults() Options {
	d := Defaults()
	set := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	set(&o.Connections, d.Connections)
	set(&o.MemoryConnections, o.Connections)
	set(&o.Tasks, d.Tasks)
	set(&o.Concurrency, d.Concurrency)
	set(&o.SlowConcurrency, d.SlowConcurrency)
	set(&o.CheckBatch, scheduler.DefaultCheckBatch)
	setD(&o.SlowLatency, d.SlowLatency)
	setD(&o.Duration, d.Duration)
	setD(&o.CheckInterval, d.CheckInterval)
	setD(&o.TokenLifetime, d.TokenLifetime)
	setD(&o.RefreshWindow, d.RefreshWindow)
	if len(o.Scenarios) == 0 {
		o.Scenarios = AllScenarios
	}
	if o.ProfileScenario == "" {
		o.ProfileScenario = ScenarioRevalidate
	}
	return o
}

func (o Options) validate() error {
	for _, s := range o.Scenarios {
		if !slices.Contains(AllScenarios, s) {
			return fmt.Errorf("unknown scenario %q: want some of %s", s, strings.Join(AllScenarios, ","))
		}
	}
	if o.CPUProfile != nil && !o.has(o.ProfileScenario) {
		return fmt.Errorf("the profiled scenario %q is not among those to run (%s)", o.ProfileScenario, strings.Join(o.Scenarios, ","))
	}
	switch {
	case o.Connections < 1, o.MemoryConnections < 1, o.Tasks < 1:
		return errors.New("connections, memory connections and tasks must be positive")
	case o.Concurrency < 1 || o.SlowConcurrency < 1:
		return errors.New("concurrency must be positive")
	case o.CheckBatch < 1 || o.CheckBatch > tasks.MaxBatch:
		return fmt.Errorf("check batch must be between 1 and %d, got %d", tasks.MaxBatch, o.CheckBatch)
	case o.SlowLatency < 0 || o.Duration < 0:
		return errors.New("durations must not be negative")
	case o.RefreshWindow >= o.TokenLifetime:
		return fmt.Errorf("refresh window %s must be shorter than the token lifetime %s", o.RefreshWindow, o.TokenLifetime)
	case o.CheckInterval < time.Second:
		return fmt.Errorf("check interval must be at least 1s, got %s", o.CheckInterval)
	}
	return nil
}

// Command is the vaultfleet bench command line of these options.
func (o Options) Command() string {
	return fmt.Sprintf("vaultfleet bench --connections %d --memory-connections %d --tasks %d --concurrency %d --check-batch %d "+
		"--slow-concurrency %d --slow-latency %s --duration %s --check-interval %s --token-lifetime %s --refresh-window %s --scenarios %s",
		o.Connections, o.MemoryConnections, o.Tasks, o.Concurrency, o.CheckBatch, o.SlowConcurrency, o.SlowLatency, o.Duration,
		o.CheckInterval, o.TokenLifetime, o.RefreshWindow, strings.Join(o.Scenarios, ","))
}

// profile starts the CPU profile if scenario is the profiled one; the
// returned function stops it.
func (e *env) profile(scenario string) (stop func()) {
	if e.o.CPUProfile == nil || scenario != e.o.ProfileScenario || e.profiled {
		return func() {}
	}
	e.profiled = true
	if err := pprof.StartCPUProfile(e.o.CPUProfile); err != nil {
		e.report.note("CPU profile not taken: %v", err)
		return func() {}
	}
	return pprof.StopCPUProfile
}

func (o Options) has(s string) bool { return slices.Contains(o.Scenarios, s) }

// Row is one line of the table: a figure beside its baseline from the same
// run, their ratio, and the goal it is held to.
type Row struct {
	Scenario string
	What     string
	Value    float64
	Unit     string
	// Baseline is 0 when the row has none.
	Baseline     float64
	BaselineWhat string
	// Ratio is Value/Baseline (0 without a baseline).
	Ratio float64
	// Goal is the goal's text ("" when the row has none); Pass whether it
	// holds.
	Goal string
	Pass bool
}

// Report is the outcome of a run.
type Report struct {
	Options Options
	Machine string
	Redis   string
	Rows    []Row
	Notes   []string
	Elapsed time.Duration
}

// Row returns the row of a scenario and figure, or nil.
func (r *Report) Row(scenario, what string) *Row {
	for i := range r.Rows {
		if r.Rows[i].Scenario == scenario && r.Rows[i].What == what {
			return &r.Rows[i]
		}
	}
	return nil
}

func (r *Report) add(row Row) {
	if row.Baseline != 0 {
		row.Ratio = row.Value / row.Baseline
	}
	r.Rows = append(r.Rows, row)
}

func (r *Report) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

// Print writes the report: machine, Redis, the table, notes.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "machine: %s\n", r.Machine)
	fmt.Fprintf(w, "redis:   %s\n", r.Redis)
	fmt.Fprintf(w, "run:     %s (%s in all)\n\n", r.Options.Command(), r.Elapsed.Round(time.Second))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight|tabwriter.Debug)
	fmt.Fprintln(tw, "scenario\tfigure\tvalue\tbaseline (same run)\tratio\tgoal\t\t")
	for _, row := range r.Rows {
		base, ratio, goal, verdict := row.cells("FAIL")
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", row.Scenario, row.What,
			formatValue(row.Value, row.Unit), base, ratio, goal, verdict)
	}
	_ = tw.Flush()
	for _, n := range r.Notes {
		fmt.Fprintf(w, "- %s\n", n)
	}
}

// Markdown writes the table as a Markdown table (for BENCHMARKS.md).
func (r *Report) Markdown(w io.Writer) {
	fmt.Fprintln(w, "| scenario | figure | value | baseline (same run) | ratio | goal | |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---|")
	for _, row := range r.Rows {
		base, ratio, goal, verdict := row.cells("**FAIL**")
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", row.Scenario, row.What,
			formatValue(row.Value, row.Unit), base, ratio, goal, verdict)
	}
}

// cells are a row's baseline, ratio, goal and verdict columns as both
// tables print them; fail is how the table marks a missed goal.
func (row Row) cells(fail string) (base, ratio, goal, verdict string) {
	base, ratio = "-", "-"
	if row.Baseline != 0 {
		base = formatValue(row.Baseline, row.Unit) + " " + row.BaselineWhat
		ratio = fmt.Sprintf("%.2f", row.Ratio)
	} else if row.BaselineWhat != "" {
		base = row.BaselineWhat
	}
	goal = "-"
	if row.Goal != "" {
		goal, verdict = row.Goal, fail
		if row.Pass {
			verdict = "pass"
		}
	}
	return base, ratio, goal, verdict
}

func formatValue(v float64, unit string) string {
	switch {
	case unit == "s":
		return time.Duration(v * float64(time.Second)).Round(time.Millisecond).String()
	case v >= 100 || v == float64(int64(v)):
		return fmt.Sprintf("%s %s", thousands(int64(v+0.5)), unit)
	case v >= 10:
		return fmt.Sprintf("%.1f %s", v, unit)
	default:
		return fmt.Sprintf("%.2f %s", v, unit)
	}
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// machine describes the host: CPUs, memory, Go.
func machine() string {
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				mem = ", MemTotal " + strings.TrimSpace(v)
			}
		}
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 3 {
			load = ", load average " + strings.Join(f[:3], " ") + " at start"
		}
	}
	return fmt.Sprintf("%d CPUs (GOMAXPROCS %d)%s, %s %s/%s%s", runtime.NumCPU(), runtime.GOMAXPROCS(0), mem,
		runtime.Version(), runtime.GOOS, runtime.GOARCH, load)
}

// env is what the scenarios share.
type env struct {
	o      Options
	rdb    *redis.Client
	rt     *roundTrips
	owned  bool // the bench started this Redis and may flush it
	report *Report
	log    *slog.Logger
	// profiled is set once the profile was taken.
	profiled bool
}

func (e *env) logf(format string, args ...any) {
	if e.o.Log != nil {
		fmt.Fprintf(e.o.Log, "bench: "+format+"\n", args...)
	}
}

// Run runs the selected scenarios and returns the report.
func Run(ctx context.Context, o Options) (*Report, error) {
	o = o.withDefaults()
	if err := o.validate(); err != nil {
		return nil, err
	}
	start := time.Now()
	e := &env{o: o, rt: &roundTrips{}, report: &Report{Options: o, Machine: machine()},
		log: slog.New(slog.DiscardHandler)}
	if o.Verbose && o.Log != nil {
		e.log = slog.New(slog.NewTextHandler(o.Log, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	if o.RedisURL != "" {
		opt, err := redis.ParseURL(o.RedisURL)
		if err != nil {
			return nil, fmt.Errorf("REDIS_URL: %w", err)
		}
		opt.PoolSize = max(opt.PoolSize, 4*max(o.Concurrency, o.SlowConcurrency))
		e.rdb = redis.NewClient(opt)
		n, err := e.rdb.DBSize(ctx).Result()
		if err != nil {
			_ = e.rdb.Close()
			return nil, fmt.Errorf("redis: %w", err)
		}
		if n > 0 && !o.ForceSharedDB {
			_ = e.rdb.Close()
			return nil, fmt.Errorf("the Redis database of REDIS_URL holds %d keys: the bench writes connections and asynq tasks there "+
				"and its servers would run any task already queued; use an empty database (or --force-shared-db on a scratch one)", n)
		}
		e.report.note("Redis from REDIS_URL (not flushed; the bench's keys stay there after the run). Its CPU and memory figures count every client of that server.")
	} else {
		srv, err := startRedis()
		if err != nil {
			return nil, err
		}
		defer srv.Close()
		e.owned = true
		e.rdb = redis.NewClient(&redis.Options{Addr: srv.addr, PoolSize: 4 * max(o.Concurrency, o.SlowConcurrency)})
		e.report.note("private redis-server on %s with the settings of docker-compose.yml: %s", srv.addr, strings.Join(ComposeRedisArgs, " "))
	}
	defer e.rdb.Close()
	e.rdb.AddHook(e.rt)
	settings, err := serverSettings(ctx, e.rdb)
	if err != nil {
		return nil, err
	}
	e.report.Redis = settings

	if err := e.runAll(ctx); err != nil {
		return e.report, err
	}
	e.report.Elapsed = time.Since(start)
	return e.report, nil
}

func (e *env) runAll(ctx context.Context) error {
	o := e.o
	if o.has(ScenarioNoop) || o.has(ScenarioValidate) || o.has(ScenarioRevalidate) || o.has(ScenarioSlow) {
		if err := e.throughputScenarios(ctx); err != nil {
			return err
		}
	}
	if o.has(ScenarioMemory) || o.has(ScenarioSweep) {
		if err := e.memoryAndSweep(ctx); err != nil {
			return err
		}
	}
	if o.has(ScenarioFreshness) {
		if err := e.freshnessScenario(ctx); err != nil {
			return err
		}
	}
	return nil
}
