package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/monitor"
	"github.com/vaultfleet/vaultfleet/internal/obs"
	"github.com/vaultfleet/vaultfleet/internal/ui"
	"github.com/vaultfleet/vaultfleet/scheduler"
)

const serveSynopsis = "Serve the HTTP API (/v1, /openapi.yaml), the Asynq monitor (/monitor), the status page (/) and /metrics (with queue and connection metrics), /healthz, /readyz."

// runServe serves the HTTP API under /v1, its OpenAPI document at
// /openapi.yaml, and /metrics, /healthz, /readyz, until ctx is done.
func runServe(ctx context.Context, args []string, env Env) error {
	cfg := newConfig(cmdServe, cmdServe, serveSynopsis, env)
	if err := cfg.parse(args); err != nil {
		return err
	}
	c := commonFrom(cfg)
	// The same tokens serve programs (bearer) and browsers (basic auth).
	tokens, err := auth.ParseTokens(cfg.str(envAPITokens))
	if err != nil {
		return err
	}
	publicURL := cfg.str(envPublicURL)
	connOpt, err := asynqConnOpt(c.redisURL)
	if err != nil {
		return err
	}
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := announceFleet(ctx, a.Redis, "serve", c.shards, a.Logger); err != nil {
		return err
	}
	client := asynq.NewClientFromRedisClient(a.Redis)
	// The Vault page and sessions, when signing keys are configured.
	var vault *vaultSetup
	if spec := cfg.str(envSessionKeys); spec != "" {
		if publicURL == "" {
			return errors.New(envPublicURL + " is required with " + envSessionKeys + " (the OAuth callback is <url>/vault/callback)")
		}
		vault, err = newVault(ctx, a, scheduler.NewNotifier(client, a.Catalog), spec, publicURL,
			cfg.str(envRedirectURIs), env.Getenv)
		if err != nil {
			return err
		}
	}
	apiCfg := api.Config{
		Store:      a.Store,
		Catalog:    a.Catalog,
		Notifier:   scheduler.NewNotifier(client, a.Catalog),
		Enqueuer:   client,
		Tokens:     tokens,
		Logger:     a.Logger,
		Registerer: a.Registry,
	}
	if vault != nil {
		apiCfg.Sessions, apiCfg.Connect, apiCfg.PublicURL = vault.Sessions, vault.Flow, publicURL
	}
	h, err := api.New(apiCfg)
	if err != nil {
		return err
	}
	// Fleet-wide numbers read from Redis at scrape time: exported here,
	// once, not by every worker.
	inspector := asynq.NewInspectorFromRedisClient(a.Redis)
	defer inspector.Close()
	if err := obs.RegisterRedisCollectors(a.Registry, obs.RedisCollectorsConfig{Store: a.Store, Catalog: a.Catalog,
		Inspector: inspector, Logger: a.Logger}); err != nil {
		return err
	}
	mon, err := monitor.New(monitor.Config{RedisConnOpt: connOpt, ReadOnly: cfg.bool("monitor-readonly"),
		PrometheusAddress: cfg.str("prometheus-url"), Authorize: tokens.Browser})
	if err != nil {
		return err
	}
	defer mon.Close()
	page := ui.New(ui.Config{Store: a.Store, Catalog: a.Catalog, QueuesFunc: queueDepths(inspector),
		MonitorPath: monitor.DefaultRootPath, Authorize: tokens.Browser, Logger: a.Logger})
	var inflight atomic.Int64
	h = trackInflight(h, &inflight)
	addr, done, err := serveOps(ctx, c.addr, a.Registry, redisReady(a.Redis), a.Logger, func(mux *http.ServeMux) {
		mountAPI(mux, h)
		if vault != nil {
			mountVaultPage(mux, trackInflight(vault.Page, &inflight))
		}
		mountPages(mux, mon, page)
	})
	if err != nil {
		return err
	}
	a.Logger.Info("serving the API", slog.String("addr", addr.String()), slog.Int("tokens", tokens.Len()))
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	// serveOps stops accepting requests once ctx is done; let the ones in
	// flight finish before Redis is closed.
	err = <-done
	deadline := time.Now().Add(shutdownGrace)
	for inflight.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	a.Logger.Info("API stopped", slog.Int64("abandoned_requests", inflight.Load()))
	return err
}

// shutdownGrace bounds the wait for requests in flight at shutdown.
const shutdownGrace = 5 * time.Second

func trackInflight(h http.Handler, n *atomic.Int64) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		defer n.Add(-1)
		h.ServeHTTP(w, r)
	})
}
