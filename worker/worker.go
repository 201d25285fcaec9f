package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Defaults of Config.
const (
	DefaultConcurrency     = 20
	DefaultShutdownTimeout = 25 * time.Second

	defaultConnectTimeout    = 5 * time.Second
	defaultCheckTimeout      = 10 * time.Second
	defaultTokenTimeout      = 15 * time.Second
	defaultMaxBodyBytes      = 1 << 20
	defaultRetryBaseDelay    = 2 * time.Second
	defaultRetryMaxDelay     = 10 * time.Minute
	defaultMaxRetryAfter     = time.Hour
	defaultRateLimitWait     = 3 * time.Second
	defaultRateLimitHeadroom = 0.05
	defaultPollInterval      = time.Second
	defaultBreakerMinReqs    = 20
	defaultBreakerRatio      = 0.5
	defaultBreakerWindow     = time.Minute
	defaultBreakerCoolDown   = 30 * time.Second
	defaultBreakerProbes     = 3
	defaultPersistTimeout    = 90 * time.Second
	defaultClientErrorPause  = 5 * time.Minute
	storeWriteTimeout        = 10 * time.Second
	maxConcurrency           = 10_000
)

// Store is what the worker needs from the connection store. *state.Store
// satisfies it.
type Store interface {
	// Get returns one connection, or state.ErrNotFound.
	Get(ctx context.Context, ref state.Ref) (*state.Connection, error)
	// GetMany reads many connections in one round trip, each as Get
	// would return it.
	GetMany(ctx context.Context, refs []state.Ref) ([]state.Got, error)
	// ApplyVerdictFrom records a valid or invalid verdict computed for the
	// credentials revision of seen, the copy the handler read (state.ErrStale
	// if the revision moved since).
	ApplyVerdictFrom(ctx context.Context, seen *state.Connection, v state.Verdict) (state.Change, error)
	// ApplyVerdictsFrom is ApplyVerdictFrom for many connections, each
	// with its own compare-and-set, the lean writes in one round trip.
	ApplyVerdictsFrom(ctx context.Context, seen []*state.Connection, vs []state.Verdict) ([]state.Change, []error)
	// RecordTransient notes provider trouble for rev without changing the
	// state.
	RecordTransient(ctx context.Context, ref state.Ref, rev int64, msg string) (state.Change, error)
	// RecordMisconfigured notes a failed check that is the consumer's own
	// doing (health misconfigured) for rev without changing the state.
	RecordMisconfigured(ctx context.Context, ref state.Ref, rev int64, msg string) (state.Change, error)
	// RecordRefreshFailure notes a transient refresh failure.
	RecordRefreshFailure(ctx context.Context, ref state.Ref, usedRefreshToken string, msg string) (state.Change, error)

	// The refresh fence (see state/refresh_fence.go and the README's
	// token refresh protocol).
	AcquireRefresh(ctx context.Context, ref state.Ref, ttl time.Duration) (*state.RefreshLease, error)
	ExtendRefresh(ctx context.Context, l *state.RefreshLease, ttl time.Duration) error
	ReleaseRefresh(ctx context.Context, l *state.RefreshLease) error
	RefreshLocked(ctx context.Context, ref state.Ref) (bool, error)
	BeginExchange(ctx context.Context, l *state.RefreshLease, lineage string, maxAge time.Duration) (state.Prior, error)
	SettleExchange(ctx context.Context, l *state.RefreshLease, known bool) error
	StoreRefreshedTokens(ctx context.Context, l *state.RefreshLease, usedRefreshToken string, t state.Tokens) (state.Change, error)
	RevokeRefresh(ctx context.Context, l *state.RefreshLease, seen *state.Connection, v state.Verdict) (state.Change, error)
	Intent(ctx context.Context, ref state.Ref) (owner, lineage, status string, at time.Time, err error)
}

var _ Store = (*state.Store)(nil)

// Config configures a Worker. Store, Catalog and Redis are required; every
// other field's zero value works.
type Config struct {
	// Store keeps the connections.
	Store Store
	// Catalog describes the integrations.
	Catalog *catalog.Catalog
	// Redis is asynq's connection; the worker's own keys (rate limits,
	// the invalid-wave guard) are reached through state's types on it,
	// the connections through Store.
	Redis redis.UniversalClient

	// Concurrency is the number of tasks processed at once. If zero,
	// DefaultConcurrency.
	Concurrency int
	// ShutdownTimeout is how long in-flight tasks may run on after Run's
	// context is done; unfinished ones go back to their queue. If zero,
	// DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
	// PollInterval is how often an idle server looks for new tasks and
	// moves due retries and scheduled tasks into their queues. If zero, 1s.
	PollInterval time.Duration

	// Transport sends check and token requests. If nil, a transport with
	// ConnectTimeout and a keep-alive pool sized for Concurrency is built.
	Transport http.RoundTripper
	// ConnectTimeout bounds dialing a provider (built transport only). If
	// zero, 5s.
	ConnectTimeout time.Duration
	// CheckTimeout bounds a check request whose catalog entry sets no
	// timeout. If zero, 10s.
	CheckTimeout time.Duration
	// TokenTimeout bounds one token request. If zero, 15s. The refresh
	// lock is held for at most TokenTimeout plus the time to store the
	// tokens.
	TokenTimeout time.Duration
	// MaxBodyBytes caps how much of a response body is read. If zero, 1 MiB.
	MaxBodyBytes int64

	// RetryBaseDelay and RetryMaxDelay shape the backoff of transient
	// failures: a delay drawn uniformly from [0, min(RetryMaxDelay,
	// RetryBaseDelay*2^n)) (full jitter), at least one second. If zero, 2s
	// and 10m.
	RetryBaseDelay time.Duration
	RetryMaxDelay  time.Duration
	// MaxRetryAfter caps a provider's Retry-After. If zero, 1h.
	MaxRetryAfter time.Duration

	// RateLimitWait is how long a check waits in the handler for the
	// fleet-wide rate limit before the task is put back for later. If
	// zero, 3s.
	RateLimitWait time.Duration
	// RateLimitHeadroom keeps the fleet this fraction under the catalog's
	// limit, to absorb network jitter between the limiter and the
	// provider. If zero, 0.05; negative means none.
	RateLimitHeadroom float64

	// BreakerMinRequests and BreakerFailureRatio trip an integration's
	// circuit breaker: at least that many checks within BreakerWindow, of
	// which at least that fraction failed transiently. If zero, 20, 0.5
	// and 1m.
	BreakerMinRequests  int
	BreakerFailureRatio float64
	BreakerWindow       time.Duration
	// BreakerCoolDown is how long an open breaker waits before letting
	// BreakerProbes probe checks through (half-open); it closes when they
	// all pass. If zero, 30s and 3.
	BreakerCoolDown time.Duration
	BreakerProbes   int

	// PersistTimeout is how long the tokens of a finished exchange are
	// retried into Redis (the provider may have rotated the refresh
	// token: losing them loses the connection), long enough to ride out a
	// Sentinel failover. If zero, 90s.
	PersistTimeout time.Duration
	// ClientErrorPause is how long an integration's refreshes pause after
	// its token endpoint rejected the fleet's own OAuth client
	// (invalid_client, unauthorized_client). If zero, 5m.
	ClientErrorPause time.Duration

	// KeyPrefix prefixes the worker's own Redis keys (rate limits, the
	// invalid-wave window; refresh leases are the store's). If empty,
	// state.DefaultPrefix.
	KeyPrefix string
	// Getenv reads the OAuth client credentials the catalog names. If nil,
	// os.Getenv.
	Getenv func(string) string
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer gets the worker's metrics. If nil, a private registry.
	Registerer prometheus.Registerer
	// NowFunc is the clock of verdicts and expiry decisions. If nil,
	// time.Now.
	NowFunc func() time.Time
	// Handlers registers more handlers by task type on the same server (e.g.
	// tasks.TypeWebhookDeliver). They get the same middleware.
	Handlers map[string]asynq.Handler
	// RetryDelays gives the retry delay of some task types (e.g.
	// events.RetryDelay for webhook deliveries); others get RetryDelay's.
	RetryDelays map[string]asynq.RetryDelayFunc
}

func (c Config) withDefaults() Config {
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	if c.PollInterval == 0 {
		c.PollInterval = defaultPollInterval
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = defaultConnectTimeout
	}
	if c.CheckTimeout == 0 {
		c.CheckTimeout = defaultCheckTimeout
	}
	if c.TokenTimeout == 0 {
		c.TokenTimeout = defaultTokenTimeout
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = defaultMaxBodyBytes
	}
	if c.RetryBaseDelay == 0 {
		c.RetryBaseDelay = defaultRetryBaseDelay
	}
	if c.RetryMaxDelay == 0 {
		c.RetryMaxDelay = defaultRetryMaxDelay
	}
	if c.MaxRetryAfter == 0 {
		c.MaxRetryAfter = defaultMaxRetryAfter
	}
	if c.RateLimitWait == 0 {
		c.RateLimitWait = defaultRateLimitWait
	}
	if c.RateLimitHeadroom == 0 {
		c.RateLimitHeadroom = defaultRateLimitHeadroom
	} else if c.RateLimitHeadroom < 0 {
		c.RateLimitHeadroom = 0
	}
	if c.BreakerMinRequests == 0 {
		c.BreakerMinRequests = defaultBreakerMinReqs
	}
	if c.BreakerFailureRatio == 0 {
		c.BreakerFailureRatio = defaultBreakerRatio
	}
	if c.BreakerWindow == 0 {
		c.BreakerWindow = defaultBreakerWindow
	}
	if c.BreakerCoolDown == 0 {
		c.BreakerCoolDown = defaultBreakerCoolDown
	}
	if c.BreakerProbes == 0 {
		c.BreakerProbes = defaultBreakerProbes
	}
	if c.PersistTimeout == 0 {
		c.PersistTimeout = defaultPersistTimeout
	}
	if c.ClientErrorPause == 0 {
		c.ClientErrorPause = defaultClientErrorPause
	}
	if c.KeyPrefix == "" {
		c.KeyPrefix = state.DefaultPrefix
	}
	if c.Getenv == nil {
		c.Getenv = os.Getenv
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.Store == nil:
		return errors.New("worker: Config.Store is required")
	case c.Catalog == nil:
		return errors.New("worker: Config.Catalog is required")
	case c.Redis == nil:
		return errors.New("worker: Config.Redis is required")
	case c.Concurrency < 1 || c.Concurrency > maxConcurrency:
		return fmt.Errorf("worker: concurrency must be between 1 and %d, got %d", maxConcurrency, c.Concurrency)
	case c.ShutdownTimeout < 0:
		return fmt.Errorf("worker: shutdown timeout must not be negative, got %s", c.ShutdownTimeout)
	case c.PollInterval < 0, c.ConnectTimeout < 0, c.CheckTimeout < 0, c.TokenTimeout < 0,
		c.RetryBaseDelay < 0, c.RetryMaxDelay < 0, c.MaxRetryAfter < 0, c.RateLimitWait < 0,
		c.BreakerWindow < 0, c.BreakerCoolDown < 0, c.PersistTimeout < 0, c.ClientErrorPause < 0:
		return errors.New("worker: durations must not be negative")
	case c.RetryMaxDelay < c.RetryBaseDelay:
		return fmt.Errorf("worker: retry max delay %s is below the base delay %s", c.RetryMaxDelay, c.RetryBaseDelay)
	case c.MaxBodyBytes < 0:
		return fmt.Errorf("worker: max body bytes must not be negative, got %d", c.MaxBodyBytes)
	case c.RateLimitHeadroom >= 1:
		return fmt.Errorf("worker: rate limit headroom must be below 1, got %g", c.RateLimitHeadroom)
	case c.BreakerMinRequests < 1:
		return fmt.Errorf("worker: breaker min requests must be positive, got %d", c.BreakerMinRequests)
	case c.BreakerFailureRatio <= 0 || c.BreakerFailureRatio > 1:
		return fmt.Errorf("worker: breaker failure ratio must be in (0, 1], got %g", c.BreakerFailureRatio)
	case c.BreakerProbes < 1:
		return fmt.Errorf("worker: breaker probes must be positive, got %d", c.BreakerProbes)
	}
	for typ, f := range c.RetryDelays {
		if f == nil {
			return fmt.Errorf("worker: extra retry delay for %q is nil", typ)
		}
	}
	for typ, h := range c.Handlers {
		switch {
		case h == nil:
			return fmt.Errorf("worker: handler for %q is nil", typ)
		case typ == tasks.TypeValidate || typ == tasks.TypeRefreshToken || typ == tasks.TypeValidateBatch:
			return fmt.Errorf("worker: handler for %q would replace a built-in one", typ)
		case typ == "":
			return errors.New("worker: handler with an empty task type")
		}
	}
	return nil
}

// Worker processes validation and refresh tasks. Build it with New, run it
// with Run.
type Worker struct {
	cfg       Config
	store     Store
	cat       *catalog.Catalog
	rdb       redis.UniversalClient
	log       *slog.Logger
	now       func() time.Time
	transport http.RoundTripper
	ownsTrans bool
	limiter   rateLimiter
	waves     waveCounter
	breakers  *breakers
	metrics   *metrics
	enqueuer  *asynq.Client
	// errLog limits the warnings and errors of the ErrorHandler.
	errLog *rate.Limiter

	mu       sync.Mutex
	handlers map[string]asynq.Handler
	running  bool // Start was called: no more Handle

	// lifeMu orders Start and Shutdown: srv is the server Start started,
	// shut says Shutdown began (Start refuses from then on).
	lifeMu       sync.Mutex
	srv          *asynq.Server
	shut         bool
	shutdownOnce sync.Once

	// inflight tracks handler goroutines, which asynq may leave running
	// for a moment after Shutdown returns.
	inflight sync.WaitGroup

	// exchanges tracks token exchanges from the moment one may start until
	// its outcome is stored (or given up): Run waits for them before it
	// returns, so Redis is never closed under an exchange whose provider
	// may already have rotated the refresh token. closing, set under exMu
	// when shutdown begins, stops new exchanges from starting.
	exMu      sync.Mutex
	closing   bool
	exchanges sync.WaitGroup
	// stopped is closed once asynq's shutdown returned: handlers still
	// waiting for Redis (awaitStore) stop waiting.
	stopped chan struct{}

	// clientErrUntil pauses an integration's refreshes after its token
	// endpoint rejected the fleet's own client (by integration id).
	clientErrMu    sync.Mutex
	clientErrUntil map[string]time.Time
}

// New validates cfg, applies defaults and returns a Worker.
func New(cfg Config) (*Worker, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	w := &Worker{
		cfg:            cfg,
		store:          cfg.Store,
		cat:            cfg.Catalog,
		rdb:            cfg.Redis,
		log:            cfg.Logger,
		now:            cfg.NowFunc,
		limiter:        state.NewRateLimiter(cfg.Redis, cfg.KeyPrefix),
		waves:          state.NewWaveCounter(cfg.Redis, cfg.KeyPrefix),
		metrics:        m,
		handlers:       map[string]asynq.Handler{},
		clientErrUntil: map[string]time.Time{},
		stopped:        make(chan struct{}),
		enqueuer:       asynq.NewClientFromRedisClient(cfg.Redis),
		errLog:         rate.NewLimiter(rate.Every(100*time.Millisecond), 50),
	}
	w.breakers = newBreakers(cfg, m, cfg.Logger)
	w.transport = cfg.Transport
	if w.transport == nil {
		w.transport = newTransport(cfg.ConnectTimeout, cfg.Concurrency, cfg.Catalog, nil)
		w.ownsTrans = true
		warnProxyIgnored(cfg.Getenv, cfg.Logger)
	}
	w.handlers[tasks.TypeValidate] = asynq.HandlerFunc(w.handleValidate)
	w.handlers[tasks.TypeValidateBatch] = asynq.HandlerFunc(w.handleValidateBatch)
	w.handlers[tasks.TypeRefreshToken] = asynq.HandlerFunc(w.handleRefresh)
	for typ, h := range cfg.Handlers {
		w.handlers[typ] = h
	}
	return w, nil
}

// newTransport is the default transport: bounded dials and handshakes, a
// keep-alive pool large enough for every worker goroutine, and a dialer
// that refuses non-public addresses the catalog does not list (dial.go;
// lookup nil: the system resolver). It uses no proxy: a proxy from the
// environment would dial providers itself, past that check.
func newTransport(connectTimeout time.Duration, concurrency int, cat *catalog.Catalog, lookup lookupFunc) *http.Transport {
	d := newGuardedDialer(&net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second}, cat, lookup)
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   connectTimeout + 5*time.Second,
		ExpectContinueTimeout: time.Second,
		MaxIdleConns:          max(100, 2*concurrency),
		MaxIdleConnsPerHost:   max(16, concurrency),
		IdleConnTimeout:       90 * time.Second,
	}
}

// Handle registers another handler by task type before Run or Start, as Config.Handlers
// does.
func (w *Worker) Handle(taskType string, h asynq.Handler) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.running {
		return errors.New("worker: Handle after Run or Start")
	}
	if h == nil || taskType == "" {
		return errors.New("worker: Handle needs a task type and a handler")
	}
	if _, dup := w.handlers[taskType]; dup {
		return fmt.Errorf("worker: a handler for %q is already registered", taskType)
	}
	w.handlers[taskType] = h
	return nil
}

// Handler returns the worker's task handler with its middleware, for tests
// and for embedding in another asynq server.
func (w *Worker) Handler() asynq.Handler {
	w.mu.Lock()
	defer w.mu.Unlock()
	mux := asynq.NewServeMux()
	known := make(map[string]bool, len(w.handlers))
	for typ, h := range w.handlers {
		mux.Handle(typ, h)
		known[typ] = true
	}
	mux.Use(w.middleware(known))
	return mux
}

// Run processes tasks until ctx is done, then shuts down gracefully:
// in-flight tasks get ShutdownTimeout to finish and whatever does not
// finish goes back to its queue. It returns an error only if the server
// could not start. A Worker runs once. Run is Start, waiting for ctx, then
// Shutdown.
func (w *Worker) Run(ctx context.Context) error {
	if err := w.Start(ctx); err != nil {
		return err
	}
	<-ctx.Done()
	w.Shutdown()
	return nil
}

// Start starts processing tasks and returns once the asynq server is
// running, like asynq's Server.Start; Shutdown stops it. It fails if ctx
// is already done, if the Worker was started before, or if asynq refuses
// to start. ctx only bounds the start: stopping is Shutdown's job.
func (w *Worker) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("worker: start: %w", err)
	}
	w.lifeMu.Lock()
	defer w.lifeMu.Unlock()
	if w.shut {
		return errors.New("worker: Start after Shutdown")
	}
	w.mu.Lock()
	if w.running {
		w.mu.Unlock()
		return errors.New("worker: Run or Start called twice")
	}
	w.running = true
	w.mu.Unlock()
	handler := w.Handler()

	srv := asynq.NewServerFromRedisClient(w.rdb, w.serverConfig())
	if err := srv.Start(handler); err != nil {
		return fmt.Errorf("worker: start: %w", err)
	}
	w.srv = srv
	w.log.Info("worker started", slog.Int("concurrency", w.cfg.Concurrency),
		slog.Duration("shutdown_timeout", w.cfg.ShutdownTimeout))
	return nil
}

// Shutdown stops the worker gracefully and returns once it is stopped: no
// token exchange starts any more, asynq's server shuts down (in-flight
// tasks get ShutdownTimeout, then go back to their queues), handlers still
// waiting for Redis stop waiting, and the token exchanges and handlers
// still running are waited for, so that the caller may close Redis. It
// may be called more than once, and without Start (then it only stops
// what New set up).
func (w *Worker) Shutdown() {
	w.shutdownOnce.Do(w.shutdown)
}

func (w *Worker) shutdown() {
	w.lifeMu.Lock()
	srv := w.srv
	w.shut = true
	w.lifeMu.Unlock()
	if srv != nil {
		w.log.Info("worker shutting down")
	}
	// No token exchange starts from here on; the ones in flight finish,
	// store their tokens and are waited for below.
	w.exMu.Lock()
	w.closing = true
	w.exMu.Unlock()
	if srv != nil {
		srv.Shutdown()
	}
	close(w.stopped)
	// asynq returns once every task is finished or put back; a handler
	// whose task was put back sees its context cancelled and returns soon,
	// except one persisting the tokens of an exchange (detached from the
	// task's context on purpose): wait for those, however long their
	// bounded retries take, before the caller may close Redis.
	w.waitFor("token exchanges", &w.exchanges)
	w.waitFor("handlers", &w.inflight)
	if w.ownsTrans {
		w.transport.(*http.Transport).CloseIdleConnections()
	}
	if srv != nil {
		w.log.Info("worker stopped")
	}
}

// waitFor waits for wg, logging every few seconds while it takes long.
func (w *Worker) waitFor(what string, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			w.log.Warn("worker: still waiting for "+what+" to finish before stopping", slog.String("what", what))
		}
	}
}

// startExchange registers a token exchange about to start, unless
// shutdown has begun (then it reports false and nothing may start).
func (w *Worker) startExchange() bool {
	w.exMu.Lock()
	defer w.exMu.Unlock()
	if w.closing {
		return false
	}
	w.exchanges.Add(1)
	return true
}

func (w *Worker) serverConfig() asynq.Config {
	return asynq.Config{
		Concurrency:              w.cfg.Concurrency,
		Queues:                   tasks.Queues(),
		StrictPriority:           false,
		RetryDelayFunc:           w.RetryDelay,
		IsFailure:                isFailure,
		ErrorHandler:             asynq.ErrorHandlerFunc(w.handleError),
		Logger:                   newAsynqLogger(w.log),
		LogLevel:                 asynq.InfoLevel,
		ShutdownTimeout:          w.cfg.ShutdownTimeout,
		TaskCheckInterval:        w.cfg.PollInterval,
		DelayedTaskCheckInterval: w.cfg.PollInterval,
	}
}

// integration returns the catalog entry of a connection's service, or nil.
func (w *Worker) integration(serviceID string) *catalog.Integration {
	in, ok := w.cat.Get(serviceID)
	if !ok {
		return nil
	}
	return in
}

// storeCtx detaches a store write from the task's cancellation: a verdict
// or tokens obtained from a provider are written even while the worker
// shuts down.
func storeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), storeWriteTimeout)
}
