package main

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
	"github.com/vaultfleet/vaultfleet/worker"
)

const workerSynopsis = `Runs the asynq server that validates connections and refreshes their OAuth tokens, on the queues
critical, default, low and events. Serves /metrics, /healthz and /readyz on --addr.`

func runWorker(ctx context.Context, args []string, env Env) error {
	cfg := newConfig(cmdWorker, cmdWorker, workerSynopsis, env)
	if err := cfg.parse(args); err != nil {
		return err
	}
	c := commonFrom(cfg)
	concurrency, shutdown, persist := cfg.int("concurrency"), cfg.duration("shutdown-timeout"), cfg.duration("persist-timeout")

	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := announceFleet(ctx, a.Redis, "worker", c.shards, a.Logger); err != nil {
		return err
	}
	// Webhooks: the delivery handler runs on the worker's server, and a
	// relay turns the state-change stream into delivery tasks (relays of
	// several workers share the stream's consumer group).
	subs, err := loadSubscriptions(cfg.str(envWebhooks), env.Getenv)
	if err != nil {
		return err
	}
	delivery, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(a.Redis, ""), Subscriptions: subs,
		Logger: a.Logger, Registerer: a.Registry})
	if err != nil {
		return err
	}
	defer delivery.CloseIdleConnections()
	w, err := worker.New(worker.Config{
		Store:           a.Store,
		Catalog:         a.Catalog,
		Redis:           a.Redis,
		Concurrency:     concurrency,
		ShutdownTimeout: shutdown,
		PersistTimeout:  persist,
		Getenv:          env.Getenv,
		Logger:          a.Logger,
		Registerer:      a.Registry,
		Handlers:        map[string]asynq.Handler{tasks.TypeWebhookDeliver: delivery},
		RetryDelays:     map[string]asynq.RetryDelayFunc{tasks.TypeWebhookDeliver: events.RetryDelay},
	})
	if err != nil {
		return err
	}
	relayDone := make(chan error, 1)
	if len(subs) > 0 {
		relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(a.Redis, ""), Enqueuer: asynq.NewClientFromRedisClient(a.Redis),
			Subscriptions: subs, Logger: a.Logger, Registerer: a.Registry})
		if err != nil {
			return err
		}
		go func() { relayDone <- relay.Run(ctx) }()
	} else {
		relayDone <- nil
	}
	addr, opsDone, err := serveOps(ctx, c.addr, a.Registry, redisReady(a.Redis), a.Logger, nil)
	if err != nil {
		return err
	}
	a.Logger.Info("ops endpoints listening", slog.String("addr", addr.String()),
		slog.Int("webhook_subscriptions", len(subs)))
	runErr := w.Run(ctx)
	if runErr != nil && ctx.Err() == nil {
		return runErr
	}
	for _, ch := range []<-chan error{relayDone, opsDone} {
		select {
		case err := <-ch:
			if err != nil && !errors.Is(err, context.Canceled) && runErr == nil {
				runErr = err
			}
		case <-time.After(6 * time.Second):
		}
	}
	return runErr
}
