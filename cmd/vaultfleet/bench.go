package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/bench"
	"github.com/vaultfleet/vaultfleet/scheduler"
)

const benchSynopsis = `Measures what a fleet costs, in one process run, and prints one table:
each figure beside its baseline from the same run, their ratio, and the
goals of issue 15 with pass/FAIL. Scenarios (--scenarios picks some):

  noop        tasks/s of a no-op asynq handler: the ceiling
  validate    first validation (added -> callable) through the real worker
  revalidate  periodic revalidation of callable connections (no change)
  slow        the worker at --slow-concurrency against a provider answering
              after --slow-latency: throughput vs C/latency, peak RSS
  memory      Redis bytes per OAuth connection (200-char access token)
  sweep       scheduler claims+enqueues of every stored connection vs raw
              asynq Client.Enqueue with the same task ids and parallelism
  freshness   --connections OAuth connections on a compressed schedule for
              --duration: check lag, tokens expired before their refresh

It starts a private redis-server (on PATH) on a free loopback port with the
Redis settings of docker-compose.yml, or uses REDIS_URL, which must name an
empty database (the bench never flushes a Redis it did not start).`

func runBench(ctx context.Context, args []string, env Env) error {
	fs := flag.NewFlagSet("vaultfleet bench", flag.ContinueOnError)
	fs.SetOutput(env.Stderr)
	d := bench.Defaults()
	var (
		o         bench.Options
		scenarios string
		small     bool
		markdown  bool
		cpuprof   string
	)
	fs.IntVar(&o.Connections, "connections", d.Connections, "connections of the sweep and freshness scenarios")
	fs.IntVar(&o.MemoryConnections, "memory-connections", 0, "connections of the memory scenario, which the sweep claims (default: --connections)")
	fs.IntVar(&o.Tasks, "tasks", d.Tasks, "tasks of each throughput scenario")
	fs.IntVar(&o.Concurrency, "concurrency", d.Concurrency, "worker concurrency of the throughput and freshness scenarios")
	fs.IntVar(&o.CheckBatch, "check-batch", scheduler.DefaultCheckBatch, "periodic checks per connection:validate_batch task (the scheduler's --check-batch)")
	fs.IntVar(&o.SlowConcurrency, "slow-concurrency", d.SlowConcurrency, "worker concurrency of the slow provider scenario")
	fs.DurationVar(&o.SlowLatency, "slow-latency", d.SlowLatency, "provider latency of the slow provider scenario")
	fs.DurationVar(&o.Duration, "duration", d.Duration, "how long the freshness scenario runs once its connections are stored")
	fs.DurationVar(&o.CheckInterval, "check-interval", d.CheckInterval, "check interval of the freshness scenario")
	fs.DurationVar(&o.TokenLifetime, "token-lifetime", d.TokenLifetime, "access token lifetime of the freshness scenario")
	fs.DurationVar(&o.RefreshWindow, "refresh-window", d.RefreshWindow, "refresh window of the freshness scenario")
	fs.StringVar(&scenarios, "scenarios", strings.Join(bench.AllScenarios, ","), "comma-separated scenarios to run")
	fs.BoolVar(&small, "small", false, "a run of a few seconds per scenario (CI); sizes and schedule flags given explicitly still apply")
	fs.BoolVar(&o.ForceSharedDB, "force-shared-db", false, "use REDIS_URL even if its database is not empty (a scratch database only: the bench's servers run whatever tasks are queued there)")
	fs.BoolVar(&markdown, "markdown", false, "also print the table as Markdown")
	fs.StringVar(&cpuprof, "cpuprofile", "", "write a CPU profile of the timed part of --profile-scenario to this file (read it with: go tool pprof -top FILE)")
	fs.StringVar(&o.ProfileScenario, "profile-scenario", bench.ScenarioRevalidate, "the scenario --cpuprofile profiles")
	fs.BoolVar(&o.Verbose, "verbose", false, "also print the warnings and errors of the bench's worker and scheduler")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: vaultfleet bench [flags]\n\n%s\n\nflags:\n", benchSynopsis)
		fs.PrintDefaults()
		fmt.Fprintf(fs.Output(), "\nenvironment:\n  REDIS_URL  an empty Redis database to use instead of a private redis-server\n")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		return errUsage
	}
	if small {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		s := bench.Small()
		if !set["connections"] {
			o.Connections = s.Connections
		}
		if !set["tasks"] {
			o.Tasks = s.Tasks
		}
		for name, p := range map[string]*time.Duration{"duration": &o.Duration, "check-interval": &o.CheckInterval,
			"token-lifetime": &o.TokenLifetime, "refresh-window": &o.RefreshWindow} {
			if !set[name] {
				*p = map[string]time.Duration{"duration": s.Duration, "check-interval": s.CheckInterval,
					"token-lifetime": s.TokenLifetime, "refresh-window": s.RefreshWindow}[name]
			}
		}
	}
	for s := range strings.SplitSeq(scenarios, ",") {
		if s = strings.TrimSpace(s); s != "" {
			o.Scenarios = append(o.Scenarios, s)
		}
	}
	o.RedisURL = env.Getenv(envRedisURL)
	o.Log = env.Stderr

	if cpuprof != "" {
		f, err := os.Create(cpuprof)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		o.CPUProfile = f
	}
	report, err := bench.Run(ctx, o)
	if report != nil && len(report.Rows) > 0 {
		report.Print(env.Stdout)
		if markdown {
			fmt.Fprintln(env.Stdout)
			report.Markdown(env.Stdout)
		}
	}
	return err
}
