package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/monitor"
	"github.com/vaultfleet/vaultfleet/internal/obs"
	"github.com/vaultfleet/vaultfleet/internal/ui"
	"github.com/vaultfleet/vaultfleet/scheduler"
)

// Environment variables of serve (and of the webhook relay the worker runs).
const (
	envAPITokens = auth.EnvTokens
	envWebhooks  = events.EnvWebhooks

	defaultServeAddr = ":8080"
)

func init() {
	knownEnv[envAPITokens] = true
	knownEnv[envWebhooks] = true
}

var serveEnvHelp = append(append(append([][2]string{}, commonEnvHelp...), vaultEnvHelp...),
	[2]string{envAPITokens, "bearer tokens accepted by the API, comma-separated (required); browsers use one as the basic-auth password for / and /monitor"},
	[2]string{envPrometheusURL, "Prometheus base URL for the monitor's metrics charts (optional)"},
	[2]string{envMonitorReadOnly, "1 or true: the Asynq monitor cannot change tasks or queues (default false)"},
)

const envMonitorReadOnly = "VAULTFLEET_MONITOR_READONLY"

func init() { knownEnv[envMonitorReadOnly] = true }

// parseBoolEnv reads a boolean variable as strconv.ParseBool does (1, t,
// true, 0, f, false, ...); unset is false, anything else an error.
func parseBoolEnv(env Env, name string) (bool, error) {
	v := strings.TrimSpace(env.Getenv(name))
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%s=%q: want true or false (1 or 0)", name, v)
	}
	return b, nil
}

// runServe serves the HTTP API under /v1, its OpenAPI document at
// /openapi.yaml, and /metrics, /healthz, /readyz, until ctx is done.
func runServe(ctx context.Context, args []string, env Env) error {
	fs := newFlagSet("serve", "Serve the HTTP API (/v1, /openapi.yaml), the Asynq monitor (/monitor), the status page (/) and /metrics (with queue and connection metrics), /healthz, /readyz.", env, serveEnvHelp)
	var c common
	c.register(fs, env, defaultServeAddr)
	promURL := fs.String("prometheus-url", env.Getenv(envPrometheusURL), "Prometheus base URL for the monitor's charts ($"+envPrometheusURL+")")
	readOnlyDefault, err := parseBoolEnv(env, envMonitorReadOnly)
	if err != nil {
		return err
	}
	readOnly := fs.Bool("monitor-readonly", readOnlyDefault, "Asynq monitor in read-only mode ($"+envMonitorReadOnly+")")
	if err := parse(fs, args); err != nil {
		return err
	}
	// The same tokens serve programs (bearer) and browsers (basic auth).
	tokens, err := auth.ParseTokens(env.Getenv(envAPITokens))
	if err != nil {
		return err
	}
	connOpt, err := asynqConnOpt(c.redisURL)
	if err != nil {
		return err
	}
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	announceFleet(ctx, a.Redis, "serve", a.Logger)
	client := asynq.NewClientFromRedisClient(a.Redis)
	// The Vault page and sessions, when signing keys are configured.
	var vault *vaultSetup
	if spec := env.Getenv(envSessionKeys); spec != "" {
		if env.Getenv(envPublicURL) == "" {
			return errors.New(envPublicURL + " is required with " + envSessionKeys + " (the OAuth callback is <url>/vault/callback)")
		}
		vault, err = newVault(ctx, a, scheduler.NewNotifier(client, a.Catalog), spec, env.Getenv(envPublicURL),
			env.Getenv(envRedirectURIs), env.Getenv)
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
		apiCfg.Sessions, apiCfg.Connect, apiCfg.PublicURL = vault.Sessions, vault.Flow, env.Getenv(envPublicURL)
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
	mon, err := monitor.New(monitor.Config{RedisConnOpt: connOpt, ReadOnly: *readOnly,
		PrometheusAddress: *promURL, Authorize: tokens.Browser})
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
