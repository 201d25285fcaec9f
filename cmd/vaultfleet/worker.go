package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
	"github.com/vaultfleet/vaultfleet/worker"
)

// Environment variables of `vaultfleet worker`.
const (
	envWorkerConcurrency     = "VAULTFLEET_CONCURRENCY"
	envWorkerShutdownTimeout = "VAULTFLEET_SHUTDOWN_TIMEOUT"
	envWorkerPersistTimeout  = "VAULTFLEET_PERSIST_TIMEOUT"

	defaultWorkerAddr = ":9101"
)

func init() {
	knownEnv[envWorkerConcurrency] = true
	knownEnv[envWorkerShutdownTimeout] = true
	knownEnv[envWorkerPersistTimeout] = true
	// The worker also reads the OAuth client credentials the built-in
	// catalog names (a catalog file given at run time may name others).
	if cat, err := catalog.Default(); err == nil {
		for _, in := range cat.Integrations {
			if in.OAuth != nil {
				for _, name := range []string{in.OAuth.ClientIDEnv, in.OAuth.ClientSecretEnv} {
					if name != "" {
						knownEnv[name] = true
					}
				}
			}
		}
	}
}

var workerEnvHelp = [][2]string{
	{envWorkerConcurrency, "tasks processed at once (default " + strconv.Itoa(worker.DefaultConcurrency) + ")"},
	{envWorkerShutdownTimeout, "how long in-flight tasks may finish after SIGTERM before they go back to the queue (default " + worker.DefaultShutdownTimeout.String() + ")"},
	{envWorkerPersistTimeout, "how long the tokens of a finished token exchange are retried into Redis (a failover) before they are given up (default 90s); SIGTERM waits for it"},
	{envWebhooks, "webhook subscriptions file: the worker relays state-change events to them and delivers them (optional)"},
	{"(catalog client_id_env, client_secret_env)", "OAuth client credentials of each integration, named by the catalog"},
}

func runWorker(ctx context.Context, args []string, env Env) error {
	var c common
	help := append(append([][2]string{}, commonEnvHelp...), workerEnvHelp...)
	fs := newFlagSet("worker",
		"Runs the asynq server that validates connections and refreshes their OAuth tokens, on the queues\n"+
			"critical, default, low and events. Serves /metrics, /healthz and /readyz on --addr.",
		env, help)
	c.register(fs, env, defaultWorkerAddr)
	concurrency, concErr := workerEnvInt(env, envWorkerConcurrency, worker.DefaultConcurrency)
	shutdown, shutErr := workerEnvDuration(env, envWorkerShutdownTimeout, worker.DefaultShutdownTimeout)
	fs.IntVar(&concurrency, "concurrency", concurrency, "tasks processed at once ($"+envWorkerConcurrency+")")
	fs.DurationVar(&shutdown, "shutdown-timeout", shutdown, "grace period for in-flight tasks on SIGTERM ($"+envWorkerShutdownTimeout+")")
	persist, persistErr := workerEnvDuration(env, envWorkerPersistTimeout, 90*time.Second)
	fs.DurationVar(&persist, "persist-timeout", persist, "retry window for storing refreshed tokens ($"+envWorkerPersistTimeout+")")
	if err := parse(fs, args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if concErr != nil && !set["concurrency"] {
		return concErr
	}
	if shutErr != nil && !set["shutdown-timeout"] {
		return shutErr
	}
	if persistErr != nil && !set["persist-timeout"] {
		return persistErr
	}
	if persist <= 0 {
		return fmt.Errorf("--persist-timeout must be positive, got %s", persist)
	}
	if concurrency < 1 {
		return fmt.Errorf("--concurrency must be at least 1, got %d", concurrency)
	}
	if shutdown <= 0 {
		return fmt.Errorf("--shutdown-timeout must be positive, got %s", shutdown)
	}

	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	announceFleet(ctx, a.Redis, "worker", a.Logger)
	// Webhooks: the delivery handler runs on the worker's server, and a
	// relay turns the state-change stream into delivery tasks (relays of
	// several workers share the stream's consumer group).
	subs, err := events.LoadFromEnv(env.Getenv)
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
		Extra:           map[string]asynq.Handler{tasks.TypeWebhookDeliver: delivery},
		ExtraRetryDelay: map[string]asynq.RetryDelayFunc{tasks.TypeWebhookDeliver: events.RetryDelay},
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

// workerEnvInt reads an integer variable; a malformed value is an error naming
// the variable, and the default stands in until the flags are parsed.
func workerEnvInt(env Env, name string, def int) (int, error) {
	s := env.Getenv(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return def, fmt.Errorf("%s: %q is not an integer", name, s)
	}
	return n, nil
}

// workerEnvDuration reads a duration variable ("25s", "1m").
func workerEnvDuration(env Env, name string, def time.Duration) (time.Duration, error) {
	s := env.Getenv(name)
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return def, fmt.Errorf("%s: %q is not a duration like 25s", name, s)
	}
	return d, nil
}
