package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/scheduler"
)

const schedulerSynopsis = `Claims due checks and token refreshes from the store's due indexes and
enqueues them as asynq tasks: periodic validations on the low queue,
refresh-ahead on default, refreshes of expired tokens on critical. Any number
of replicas may run at once: claims are atomic and task ids dedupe. Periodic
checks pause while the low queue holds --max-low-pending tasks; refreshes go
on. Serves /metrics, /healthz and /readyz on --addr; stops on SIGTERM.`

// schedulerFlags are the settings of `vaultfleet scheduler`.
type schedulerFlags struct {
	tick, lease   time.Duration
	batch         int
	jitter        float64
	maxLowPending int
	concurrency   int
	checkBatch    int
}

func runScheduler(ctx context.Context, args []string, env Env) error {
	conf := newConfig(cmdScheduler, cmdScheduler, schedulerSynopsis, env)
	if err := conf.parse(args); err != nil {
		return err
	}
	c := commonFrom(conf)
	f := schedulerFlagsFrom(conf)
	cfg := f.config()
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := announceFleet(ctx, a.Redis, "scheduler", c.shards, a.Logger); err != nil {
		return err
	}
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
		slog.Int("enqueue_concurrency", f.concurrency), slog.Int("check_batch", f.checkBatch),
		slog.Int("shards", a.Store.Shards()))

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

// schedulerFlagsFrom reads the scheduler's settings from a parsed config.
func schedulerFlagsFrom(conf *config) schedulerFlags {
	return schedulerFlags{tick: conf.duration("tick"), lease: conf.duration("lease"), batch: conf.int("batch"),
		jitter: conf.float("jitter"), maxLowPending: conf.int("max-low-pending"), concurrency: conf.int("enqueue-concurrency"),
		checkBatch: conf.int("check-batch")}
}

// config maps the settings (bounds checked by the table) onto
// scheduler.Config, where a zero value means "default": here 0 means off.
func (f schedulerFlags) config() scheduler.Config {
	cfg := scheduler.Config{Tick: f.tick, Batch: f.batch, Lease: f.lease, Jitter: f.jitter,
		MaxLowPending: f.maxLowPending, EnqueueConcurrency: f.concurrency, CheckBatch: f.checkBatch}
	if f.jitter == 0 {
		cfg.Jitter = -1
	}
	if f.maxLowPending == 0 {
		cfg.MaxLowPending = -1
	}
	return cfg
}
