package main

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/scheduler"
)

// Environment variables of `vaultfleet scheduler`.
const (
	envSchedTick               = "VAULTFLEET_TICK"
	envSchedBatch              = "VAULTFLEET_BATCH"
	envSchedLease              = "VAULTFLEET_LEASE"
	envSchedJitter             = "VAULTFLEET_JITTER"
	envSchedMaxLowPending      = "VAULTFLEET_MAX_LOW_PENDING"
	envSchedEnqueueConcurrency = "VAULTFLEET_ENQUEUE_CONCURRENCY"
)

func init() {
	for _, e := range []string{envSchedTick, envSchedBatch, envSchedLease, envSchedJitter,
		envSchedMaxLowPending, envSchedEnqueueConcurrency} {
		knownEnv[e] = true
	}
}

var schedulerEnvHelp = [][2]string{
	{envSchedTick, "pause between sweeps (same as --tick)"},
	{envSchedBatch, "members claimed per shard per claim (same as --batch)"},
	{envSchedLease, "how long a claim is held before it is due again (same as --lease)"},
	{envSchedJitter, "spread of the next check time, a fraction of the interval (same as --jitter)"},
	{envSchedMaxLowPending, "pending size of the low queue that pauses periodic checks (same as --max-low-pending)"},
	{envSchedEnqueueConcurrency, "parallel enqueues (same as --enqueue-concurrency)"},
}

const schedulerSynopsis = `Claims due checks and token refreshes from the store's due indexes and
enqueues them as asynq tasks: periodic validations on the low queue,
refresh-ahead on default, refreshes of expired tokens on critical. Any number
of replicas may run at once: claims are atomic and task ids dedupe. Periodic
checks pause while the low queue holds --max-low-pending tasks; refreshes go
on. Serves /metrics, /healthz and /readyz on --addr; stops on SIGTERM.`

// schedulerFlags are the flags of `vaultfleet scheduler`.
type schedulerFlags struct {
	tick, lease   time.Duration
	batch         int
	jitter        float64
	maxLowPending int
	concurrency   int
}

func runScheduler(ctx context.Context, args []string, env Env) error {
	fs := newFlagSet("scheduler", schedulerSynopsis, env, append(append([][2]string{}, commonEnvHelp...), schedulerEnvHelp...))
	var c common
	c.register(fs, env, ":9102")
	var f schedulerFlags
	var envErr error
	envDur := func(name string, def time.Duration) time.Duration {
		v := env.Getenv(name)
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil && envErr == nil {
			envErr = fmt.Errorf("%s: %q is not a duration like 1s or 2m", name, v)
		}
		return d
	}
	envInt := func(name string, def int) int {
		v := env.Getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil && envErr == nil {
			envErr = fmt.Errorf("%s: %q is not a whole number", name, v)
		}
		return n
	}
	jitterDef := scheduler.DefaultJitter
	if v := env.Getenv(envSchedJitter); v != "" {
		var err error
		if jitterDef, err = strconv.ParseFloat(v, 64); err != nil {
			envErr = fmt.Errorf("%s: %q is not a number like 0.1", envSchedJitter, v)
		}
	}
	fs.DurationVar(&f.tick, "tick", envDur(envSchedTick, scheduler.DefaultTick), "pause between sweeps ($"+envSchedTick+")")
	fs.IntVar(&f.batch, "batch", envInt(envSchedBatch, scheduler.DefaultBatch), "members one claim takes from one shard; a shard is claimed again while batches come back full ($"+envSchedBatch+")")
	fs.DurationVar(&f.lease, "lease", envDur(envSchedLease, scheduler.DefaultLease), "how long a claim is held: work whose enqueue failed is due again after it ($"+envSchedLease+")")
	fs.Float64Var(&f.jitter, "jitter", jitterDef, "spread of the next check time: ±jitter × the interval, 0 to 0.5 ($"+envSchedJitter+")")
	fs.IntVar(&f.maxLowPending, "max-low-pending", envInt(envSchedMaxLowPending, scheduler.DefaultMaxLowPending), "pause periodic checks while the low queue holds this many pending tasks; 0 means no limit ($"+envSchedMaxLowPending+")")
	fs.IntVar(&f.concurrency, "enqueue-concurrency", envInt(envSchedEnqueueConcurrency, scheduler.DefaultEnqueueConcurrency), "parallel enqueues ($"+envSchedEnqueueConcurrency+")")
	if envErr != nil {
		return envErr
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := f.config()
	if err != nil {
		return err
	}
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	announceFleet(ctx, a.Redis, "scheduler", a.Logger)
	cfg.Store, cfg.Catalog = a.Store, a.Catalog
	cfg.Client = asynq.NewClientFromRedisClient(a.Redis)
	cfg.Inspector = asynq.NewInspectorFromRedisClient(a.Redis)
	cfg.Logger, cfg.Registerer = a.Logger, a.Registry
	sch, err := scheduler.New(cfg)
	if err != nil {
		return err
	}
	// Ops first, so that /readyz answers while the first sweep runs.
	addr, done, err := serveOps(ctx, c.addr, a.Registry, redisReady(a.Redis), a.Logger, nil)
	if err != nil {
		return err
	}
	a.Logger.Info("scheduler: started", slog.String("addr", addr.String()),
		slog.Duration("tick", f.tick), slog.Int("batch", f.batch), slog.Duration("lease", f.lease),
		slog.Float64("jitter", f.jitter), slog.Int("max_low_pending", f.maxLowPending),
		slog.Int("enqueue_concurrency", f.concurrency), slog.Int("shards", a.Store.Shards()))

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- sch.Run(runCtx) }()

	select {
	case err = <-done:
		cancel()
		runErr := <-ran
		if ctx.Err() == nil {
			// The ops server ended before a stop was asked for.
			if err == nil {
				err = fmt.Errorf("ops server on %s stopped", addr)
			}
			return err
		}
		err = runErr
	case err = <-ran:
		if serr := <-done; serr != nil && err == nil {
			err = serr
		}
	}
	a.Logger.Info("scheduler: stopped")
	return err
}

// config checks the flags and maps them onto scheduler.Config, where a
// zero value means "default": here 0 means off.
func (f schedulerFlags) config() (scheduler.Config, error) {
	switch {
	case f.tick <= 0:
		return scheduler.Config{}, fmt.Errorf("--tick must be positive, got %v", f.tick)
	case f.batch < 1 || f.batch > 100_000:
		return scheduler.Config{}, fmt.Errorf("--batch must be between 1 and 100000, got %d", f.batch)
	case f.lease < time.Second:
		return scheduler.Config{}, fmt.Errorf("--lease must be at least 1s, got %v", f.lease)
	case !(f.jitter >= 0 && f.jitter <= 0.5):
		return scheduler.Config{}, fmt.Errorf("--jitter must be between 0 and 0.5, got %v", f.jitter)
	case f.maxLowPending < 0:
		return scheduler.Config{}, fmt.Errorf("--max-low-pending must not be negative, got %d", f.maxLowPending)
	case f.concurrency < 1 || f.concurrency > 1024:
		return scheduler.Config{}, fmt.Errorf("--enqueue-concurrency must be between 1 and 1024, got %d", f.concurrency)
	}
	cfg := scheduler.Config{Tick: f.tick, Batch: f.batch, Lease: f.lease, Jitter: f.jitter,
		MaxLowPending: f.maxLowPending, EnqueueConcurrency: f.concurrency}
	if f.jitter == 0 {
		cfg.Jitter = -1
	}
	if f.maxLowPending == 0 {
		cfg.MaxLowPending = -1
	}
	return cfg, nil
}
