package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/scheduler"
)

// Environment variables of serve (and of the webhook relay the worker runs).
const (
	envAPITokens = "VAULTFLEET_API_TOKENS"
	envWebhooks  = events.EnvWebhooks

	defaultServeAddr = ":8080"
)

func init() {
	knownEnv[envAPITokens] = true
	knownEnv[envWebhooks] = true
}

var serveEnvHelp = append(append([][2]string{}, commonEnvHelp...),
	[2]string{envAPITokens, "bearer tokens accepted by the API, comma-separated (required)"},
)

// serveMounts is the hook for what else serve puts on its mux (the Asynq
// monitor at /monitor and the status page at / come in later issues).
var serveMounts []func(mux *http.ServeMux, a *app)

// runServe serves the HTTP API under /v1, its OpenAPI document at
// /openapi.yaml, and /metrics, /healthz, /readyz, until ctx is done.
func runServe(ctx context.Context, args []string, env Env) error {
	fs := newFlagSet("serve", "Serve the HTTP API (/v1, /openapi.yaml) with /metrics, /healthz and /readyz.", env, serveEnvHelp)
	var c common
	c.register(fs, env, defaultServeAddr)
	if err := parse(fs, args); err != nil {
		return err
	}
	tokens := parseTokens(env.Getenv(envAPITokens))
	if len(tokens) == 0 {
		return errors.New("no API token configured: set " + envAPITokens + "=token[,token...]")
	}
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	client := asynq.NewClientFromRedisClient(a.Redis)
	h, err := api.New(api.Config{
		Store:      a.Store,
		Catalog:    a.Catalog,
		Notifier:   scheduler.NewNotifier(client, a.Catalog),
		Enqueuer:   client,
		Tokens:     tokens,
		Logger:     a.Logger,
		Registerer: a.Registry,
	})
	if err != nil {
		return err
	}
	var inflight atomic.Int64
	h = trackInflight(h, &inflight)
	addr, done, err := serveOps(ctx, c.addr, a.Registry, redisReady(a.Redis), a.Logger, func(mux *http.ServeMux) {
		mux.Handle("/v1/", h)
		mux.Handle("/openapi.yaml", h)
		for _, m := range serveMounts {
			m(mux, a)
		}
	})
	if err != nil {
		return err
	}
	a.Logger.Info("serving the API", slog.String("addr", addr.String()), slog.Int("tokens", len(tokens)))
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

// parseTokens splits a comma-separated token list, dropping blanks.
func parseTokens(s string) []string {
	var out []string
	for t := range strings.SplitSeq(s, ",") {
		if t = strings.TrimSpace(t); t != "" {
			out = append(out, t)
		}
	}
	return out
}
