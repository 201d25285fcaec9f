package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/monitor"
	"github.com/vaultfleet/vaultfleet/internal/obs"
	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/internal/ui"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
	"github.com/vaultfleet/vaultfleet/worker"
)

// devOptions are the dev command's flags.
type devOptions struct {
	addr         string
	redisURL     string
	consumers    int
	speed        float64
	concurrency  int
	summaryEvery time.Duration
	logLevel     string
	logFormat    string
	tenantAfter  time.Duration
	shards       int
}

// runDev runs the whole fleet in one process: an embedded Redis (or
// REDIS_URL), simulated providers, demo connections, scheduler, worker,
// API, Asynq monitor, status page and metrics.
func runDev(ctx context.Context, args []string, env Env) error {
	cfg := newConfig(cmdDev, cmdDev, "Run the whole fleet in one process on an embedded Redis, with simulated providers and demo connections.", env)
	if err := cfg.parse(args); err != nil {
		return err
	}
	o := devOptions{addr: cfg.str("addr"), redisURL: cfg.str("redis"), consumers: cfg.int("consumers"),
		speed: cfg.float("speed"), concurrency: cfg.int("concurrency"), summaryEvery: cfg.duration("summary"),
		logLevel: cfg.str("log-level"), logFormat: cfg.str("log-format"), tenantAfter: cfg.duration("tenant-after"),
		shards: cfg.int("shards")}
	logger, err := newLogger(env.Stderr, o.logFormat, o.logLevel)
	if err != nil {
		return err
	}

	// Bind first: a second dev on the same port fails before it starts
	// anything else.
	tokenSpec := cfg.str(envAPITokens)
	var tokens *auth.Tokens
	if strings.TrimSpace(tokenSpec) != "" {
		if tokens, err = auth.ParseTokens(tokenSpec); err != nil {
			return err
		}
	} else if !loopbackAddr(o.addr) {
		return fmt.Errorf("--addr %s is not a loopback address: set %s to serve the API there", o.addr, envAPITokens)
	}
	ln, err := listen(o.addr)
	if err != nil {
		return err
	}
	defer ln.Close()

	rdb, connOpt, stopRedis, redisURL, err := devRedis(o.redisURL)
	if err != nil {
		return err
	}
	defer stopRedis()
	embedded := o.redisURL == ""

	keySpec := cfg.str(secrets.EnvKeys)
	if keySpec == "" {
		if keySpec, err = devKey(ctx, rdb, embedded); err != nil {
			return err
		}
	}
	keys, err := secrets.ParseKeyring(keySpec)
	if err != nil {
		return err
	}

	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	g, gctx := errgroup.WithContext(runCtx)
	// abort ends what already runs before dev returns err: the worker must
	// be stopped before its Redis client is closed.
	abort := func(err error) error {
		stopRun()
		_ = g.Wait()
		return err
	}
	providers, err := sim.Start(gctx, sim.Config{Speed: o.speed, Logger: logger})
	if err != nil {
		return err
	}
	defer providers.Close()
	cat, err := catalog.Parse(providers.CatalogYAML())
	if err != nil {
		return fmt.Errorf("dev catalog: %w", err)
	}
	reg := newRegistry()
	store, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys, Shards: o.shards, Logger: logger, Registerer: reg})
	if err != nil {
		return err
	}

	a := &app{Logger: logger, Redis: rdb, Catalog: cat, Keys: keys, Store: store}
	if err := announceFleet(ctx, rdb, "dev", o.shards, logger); err != nil {
		return err
	}
	a.Registry = reg
	client := asynq.NewClientFromRedisClient(rdb)
	defer client.Close()
	inspector := asynq.NewInspectorFromRedisClient(rdb)
	defer inspector.Close()

	clientEnv := providers.ClientEnv()
	getenv := func(k string) string {
		if v, ok := clientEnv[k]; ok {
			return v
		}
		return env.Getenv(k)
	}
	subs, err := loadSubscriptions(cfg.str(envWebhooks), env.Getenv)
	if err != nil {
		return err
	}
	delivery, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""), Subscriptions: subs, Logger: logger, Registerer: reg})
	if err != nil {
		return err
	}
	wk, err := worker.New(worker.Config{
		Store: store, Catalog: cat, Redis: rdb, Concurrency: o.concurrency,
		ShutdownTimeout: 3 * time.Second, Getenv: getenv, Logger: logger, Registerer: reg,
		Handlers:    map[string]asynq.Handler{tasks.TypeWebhookDeliver: delivery},
		RetryDelays: map[string]asynq.RetryDelayFunc{tasks.TypeWebhookDeliver: events.RetryDelay},
	})
	if err != nil {
		return err
	}
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: client, Subscriptions: subs, StartID: "$", Logger: logger, Registerer: reg})
	if err != nil {
		return err
	}
	sched, err := scheduler.New(scheduler.Config{
		Store: store, Catalog: cat, Client: client, Inspector: inspector,
		Tick: time.Second, Lease: 30 * time.Second, Logger: logger, Registerer: reg,
	})
	if err != nil {
		return err
	}
	notifier := scheduler.NewNotifier(client, cat)
	base := "http://" + ln.Addr().String()
	publicURL := or(cfg.str(envPublicURL), base)
	vault, err := newVault(gctx, a, notifier, or(cfg.str(envSessionKeys), session.NewKey("dev")),
		publicURL, cfg.str(envRedirectURIs), getenv)
	if err != nil {
		return err
	}
	apiCfg := api.Config{Store: store, Catalog: cat, Notifier: notifier, Enqueuer: client, Logger: logger, Registerer: reg}
	var browser func(*http.Request) bool
	if tokens != nil {
		apiCfg.Tokens = tokens
		browser = tokens.Browser
	} else {
		apiCfg.AllowNoAuth = true
	}
	apiCfg.Sessions, apiCfg.Connect, apiCfg.PublicURL = vault.Sessions, vault.Flow, publicURL
	apiHandler, err := api.New(apiCfg)
	if err != nil {
		return err
	}
	mon, err := monitor.New(monitor.Config{RedisConnOpt: connOpt, Authorize: browser,
		PrometheusAddress: cfg.str("prometheus-url")})
	if err != nil {
		return err
	}
	defer mon.Close()
	page := ui.New(ui.Config{Store: store, Catalog: cat, QueuesFunc: queueDepths(inspector),
		MonitorPath: monitor.DefaultRootPath, Authorize: browser, Title: "vaultfleet dev", Logger: logger})
	if err := obs.RegisterRedisCollectors(reg, obs.RedisCollectorsConfig{Store: store, Catalog: cat,
		Inspector: inspector, Logger: logger}); err != nil {
		return err
	}

	var handler http.Handler = opsMux(reg, redisReady(rdb), func(mux *http.ServeMux) {
		mountAPI(mux, apiHandler)
		mountVaultPage(mux, vault.Page)
		mountPages(mux, mon, page)
	})
	if tokens == nil {
		// The API and the monitor are open: a page on another site must
		// not reach them through a name rebound to 127.0.0.1.
		handler = loopbackHostsOnly(handler)
	}
	done := startServer(gctx, ln, handler, logger)
	g.Go(func() error { return <-done })
	g.Go(func() error { return wk.Run(gctx) })
	g.Go(func() error { return sched.Run(gctx) })
	g.Go(func() error { return relay.Run(gctx) })

	// A Redis kept from an earlier run holds that run's demo connections,
	// minted by providers that are gone: start their story afresh.
	for _, ref := range sim.Refs(o.consumers) {
		if _, err := store.Delete(gctx, ref, 0); err != nil && !errors.Is(err, state.ErrNotFound) {
			return abort(fmt.Errorf("reset demo connection %s in %s (set %s to the key that sealed it, or use an empty Redis): %w",
				ref, redact.URL(redisURL), secrets.EnvKeys, err))
		}
	}
	seeded, err := sim.Seed(gctx, store, providers, o.consumers)
	if err != nil {
		return abort(fmt.Errorf("seed demo connections: %w", err))
	}
	// Validate what was seeded at once, as the API does after a write.
	for _, sc := range seeded {
		if !sc.Written {
			continue
		}
		// The notifier asks the policy (state.TasksAfterWrite), so the
		// task is the one a consumer's write makes: the same id, no
		// second validation of the revision.
		c, err := store.Get(gctx, sc.Ref)
		if err == nil {
			err = notifier.Notify(gctx, state.Change{After: c})
		}
		if err != nil {
			logger.Warn("enqueue first validation", slog.String("connection_id", sc.Ref.ConnectionID), slog.String("error", err.Error()))
		}
	}
	g.Go(func() error { return chooseTenants(gctx, o.tenantAfter, store, notifier, seeded, logger) })

	printBanner(env.Stdout, base, redisURL, embedded, tokens != nil, seeded)
	if link, err := demoSession(vault.Sessions, base); err == nil {
		fmt.Fprintf(env.Stdout, "  Vault page   %s\n               (a demo session of consumer vault-demo; the simulated login takes any user and password %q)\n", link, sim.DemoPassword)
		if k, err := providers.IssueAPIKey(sim.BambooHR, sim.Account("vaultdemo")); err == nil {
			fmt.Fprintf(env.Stdout, "               BambooHR for the demo: subdomain %s, API key %s\n", k.Subdomain, k.Key)
		}
	}
	if o.summaryEvery > 0 {
		g.Go(func() error { return printSummaries(gctx, env.Stdout, o.summaryEvery, store, inspector, providers) })
	}

	err = g.Wait()
	if ctx.Err() != nil {
		fmt.Fprintln(env.Stdout, "vaultfleet dev: stopped")
		return nil
	}
	return err
}

// mountAPI puts the API handler on its routes.
func mountAPI(mux *http.ServeMux, h http.Handler) {
	mux.Handle("/v1/", h)
	mux.Handle("/vault/", h)
	mux.Handle("GET /openapi.yaml", h)
}

// pageTimeout bounds a monitor or status-page request. Both read Redis
// through asynq's Inspector, which takes no context: without a bound, a
// stalled Redis hangs them for its read timeout times every command. A
// request past it gets 503 (the read is abandoned, not cancelled).
const pageTimeout = 5 * time.Second

// mountPages puts the Asynq monitor and the status page on their routes,
// each behind pageTimeout.
func mountPages(mux *http.ServeMux, mon, page http.Handler) {
	mon = http.TimeoutHandler(mon, pageTimeout, "the monitor did not answer in time (Redis slow or unreachable); retry")
	mux.Handle(monitor.DefaultRootPath+"/", mon)
	mux.Handle(monitor.DefaultRootPath, mon)
	mux.Handle("GET /{$}", http.TimeoutHandler(page, pageTimeout, "the status page did not answer in time (Redis slow or unreachable); retry"))
}

// devRedis opens url when set, else starts an embedded miniredis on
// loopback. It returns the URL other processes reach it at.
func devRedis(url string) (rdb redis.UniversalClient, opt asynq.RedisConnOpt, stop func(), at string, err error) {
	if url != "" {
		if rdb, err = openRedis(url); err != nil {
			return nil, nil, nil, "", err
		}
		if opt, err = asynqConnOpt(url); err != nil {
			_ = rdb.Close()
			return nil, nil, nil, "", err
		}
		return rdb, opt, func() { _ = rdb.Close() }, url, nil
	}
	m := miniredis.NewMiniRedis()
	if err := m.StartAddr("127.0.0.1:0"); err != nil {
		return nil, nil, nil, "", fmt.Errorf("start embedded redis: %v", err)
	}
	c := redis.NewClient(&redis.Options{Addr: m.Addr()})
	return c, asynq.RedisClientOpt{Addr: m.Addr()}, func() { _ = c.Close(); m.Close() }, "redis://" + m.Addr() + "/0", nil
}

// devKeyKey holds dev's encryption key in the Redis dev runs on (not the
// embedded one), so that the next dev run on that Redis opens what this
// one sealed. Only dev does this: a fleet's keys never live in Redis.
const devKeyKey = "vaultfleet:dev:encryption-key"

// devKey returns the key dev seals credentials with when
// VAULTFLEET_ENCRYPTION_KEYS is unset: a fresh one on the embedded Redis;
// on REDIS_URL, the one an earlier dev run left there, or a fresh one kept
// there for the next run.
func devKey(ctx context.Context, rdb redis.UniversalClient, embedded bool) (string, error) {
	fresh := secrets.NewKey("dev")
	if embedded {
		return fresh, nil
	}
	ctx, cancel := context.WithTimeout(ctx, announceTimeout)
	defer cancel()
	if err := rdb.SetNX(ctx, devKeyKey, fresh, 0).Err(); err != nil {
		return "", fmt.Errorf("keep the dev encryption key in Redis: %v", err)
	}
	spec, err := rdb.Get(ctx, devKeyKey).Result()
	if err != nil {
		return "", fmt.Errorf("read the dev encryption key from Redis: %v", err)
	}
	return spec, nil
}

// loopbackAddr reports whether addr binds only to a loopback address.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loopbackHostsOnly answers 421 to a request whose Host is not a loopback
// name (localhost, 127.0.0.1 or [::1], any port): without it, DNS
// rebinding lets a web page on another site drive dev's open API and
// monitor through the visitor's browser.
func loopbackHostsOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !loopbackHost(r.Host) {
			w.Header().Set("Connection", "close")
			http.Error(w, "misdirected request: vaultfleet dev answers only to localhost, 127.0.0.1 or [::1] (set "+envAPITokens+" to serve other names)", http.StatusMisdirectedRequest)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// loopbackHost reports whether a Host header names loopback.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Zone() == "" && ip.Unmap().IsLoopback()
}

// loadSubscriptions loads the webhook subscriptions file at path (none
// when path is empty); getenv reads the secrets it names.
func loadSubscriptions(path string, getenv func(string) string) ([]events.Subscription, error) {
	if path == "" {
		return nil, nil
	}
	subs, err := events.LoadSubscriptions(path, getenv)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", envWebhooks, err)
	}
	return subs, nil
}

// queueDepths reads the queues for the status page.
func queueDepths(in *asynq.Inspector) func(context.Context) ([]ui.Queue, error) {
	return func(context.Context) ([]ui.Queue, error) {
		var out []ui.Queue
		known, err := in.Queues()
		if err != nil {
			return nil, err
		}
		for _, q := range []string{tasks.QueueCritical, tasks.QueueDefault, tasks.QueueLow, tasks.QueueEvents} {
			if !slices.Contains(known, q) {
				out = append(out, ui.Queue{Name: q}) // nothing enqueued there yet
				continue
			}
			info, err := in.GetQueueInfo(q)
			if err != nil {
				return out, err
			}
			out = append(out, ui.Queue{Name: q, Pending: info.Pending, Active: info.Active, Scheduled: info.Scheduled,
				Retry: info.Retry, Archived: info.Archived, Processed: info.Processed, Failed: info.Failed})
		}
		return out, nil
	}
}

// chooseTenants picks the Xero tenant of the demo connections that are to
// become callable, after a while, as a consumer would.
func chooseTenants(ctx context.Context, after time.Duration, store *state.Store, n *scheduler.Notifier, seeded []sim.SeededConnection, logger *slog.Logger) error {
	select {
	case <-ctx.Done():
		return nil
	case <-time.After(after):
	}
	kept := false
	for _, sc := range seeded {
		if sc.TenantID == "" || sc.Then != state.Callable {
			continue
		}
		if !kept { // one stays authorized, so the state keeps showing
			kept = true
			continue
		}
		ch, err := sim.ChooseTenant(ctx, store, sc)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			logger.Warn("choose tenant", slog.String("connection_id", sc.Ref.ConnectionID), slog.String("error", err.Error()))
			continue
		}
		if err := n.Notify(ctx, ch); err != nil {
			logger.Warn("notify", slog.String("error", err.Error()))
		}
	}
	return nil
}

func printBanner(w io.Writer, base, redisURL string, embedded, authOn bool, seeded []sim.SeededConnection) {
	redisNote := "embedded Redis (miniredis; nothing is kept after exit)"
	redisLine := fmt.Sprintf("  Redis        %s   (embedded; for vaultfleet enqueue and other services while dev runs:)\nexport %s=%s\n",
		redisURL, envRedisURL, redisURL)
	if !embedded {
		redisNote = "the Redis that " + envRedisURL + " (or --redis) names"
		redisLine = fmt.Sprintf("  Redis        %s   (dev writes there: demo connections, tasks, and its dev key under %s)\n",
			redact.URL(redisURL), devKeyKey)
	}
	stored, available := 0, 0
	for _, sc := range seeded {
		if sc.Written {
			stored++
		} else {
			available++
		}
	}
	authNote := "no token needed: loopback only; set " + envAPITokens + " to require one"
	if authOn {
		authNote = "Authorization: Bearer <one of " + envAPITokens + ">; browsers: any user, a token as password"
	}
	fmt.Fprintf(w, `vaultfleet dev: the whole fleet in one process on %s
  status page  %s/
  API          %s/v1/connections      (%s)
  one consumer %s/v1/consumers/acme/connections
  OpenAPI      %s/openapi.yaml
  monitor      %s/monitor/
  metrics      %s/metrics
%sseeded %d demo connections (%d more integrations left available); simulated providers: Salesforce-like, BambooHR-like, Xero-like, and a flaky Pipedrive-like one.
Ctrl-C stops.
`, redisNote, base, base, authNote, base, base, base, base, redisLine, stored, available)
}

// printSummaries prints one line every interval: connections per state,
// provider calls, tasks queued.
func printSummaries(ctx context.Context, w io.Writer, every time.Duration, store *state.Store, in *asynq.Inspector, p *sim.Providers) error {
	t := time.NewTicker(every)
	defer t.Stop()
	var mu sync.Mutex
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		counts, err := store.Counts(ctx)
		if err != nil {
			continue
		}
		per := map[state.State]int64{}
		for k, n := range counts {
			per[k.State] += n
		}
		queued := 0
		qs, _ := queueDepths(in)(ctx)
		for _, q := range qs {
			queued += q.Pending + q.Scheduled + q.Retry + q.Active
		}
		tot := p.Stats().Total()
		mu.Lock()
		fmt.Fprintf(w, "%s  added=%d authorized=%d invalid=%d callable=%d | checks=%d refreshes=%d rotations=%d | provider 5xx=%d 429=%d | tasks queued=%d\n",
			time.Now().Format("15:04:05"), per[state.Added], per[state.Authorized], per[state.Invalid], per[state.Callable],
			tot.Checks, tot.Refreshes, tot.Rotations, tot.ServerErrors, tot.Throttled, queued)
		mu.Unlock()
	}
}
