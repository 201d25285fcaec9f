package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

// common holds the settings every process shares.
type common struct {
	redisURL  string
	catalog   string
	addr      string
	logFormat string
	logLevel  string
	shards    int
	keys      string
	// ackReps is VAULTFLEET_ACK_REPLICAS when ackSet.
	ackReps int
	ackSet  bool
}

// commonFrom takes the shared settings from a parsed config.
func commonFrom(cfg *config) common {
	c := common{redisURL: cfg.str("redis"), catalog: cfg.str("catalog"), logFormat: cfg.str("log-format"),
		logLevel: cfg.str("log-level"), shards: cfg.int("shards"), keys: cfg.str(secrets.EnvKeys)}
	if cfg.reads("addr") {
		c.addr = cfg.str("addr")
	}
	if cfg.reads(envAckReps) {
		c.ackReps, c.ackSet = cfg.intOK(envAckReps)
	}
	return c
}

// ackReplicas is VAULTFLEET_ACK_REPLICAS, or its default for the URL: a
// Sentinel deployment has replicas, and a failover drops what the old
// master acknowledged alone.
func (c *common) ackReplicas() int {
	if c.ackSet {
		return c.ackReps
	}
	if strings.HasPrefix(c.redisURL, "redis-sentinel://") {
		return 1
	}
	return 0
}

// app is what a process is built from.
type app struct {
	Logger   *slog.Logger
	Redis    redis.UniversalClient
	Catalog  *catalog.Catalog
	Keys     *secrets.Keyring
	Store    *state.Store
	Registry *prometheus.Registry
}

// setup validates the shared configuration and opens Redis, the catalog,
// the keyring and the store. Errors are one line, never a secret.
func (c *common) setup(w io.Writer) (*app, error) {
	logger, err := newLogger(w, c.logFormat, c.logLevel)
	if err != nil {
		return nil, err
	}
	keys, err := secrets.ParseKeyring(c.keys)
	if err != nil {
		return nil, err
	}
	var cat *catalog.Catalog
	if c.catalog != "" {
		cat, err = catalog.Load(c.catalog)
	} else {
		cat, err = catalog.Default()
	}
	if err != nil {
		return nil, err
	}
	rdb, err := openRedis(c.redisURL)
	if err != nil {
		return nil, err
	}
	reg := newRegistry()
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys, Shards: c.shards, Logger: logger, Registerer: reg,
		AckReplicas: c.ackReplicas()})
	if err != nil {
		_ = rdb.Close()
		return nil, err
	}
	return &app{Logger: logger, Redis: rdb, Catalog: cat, Keys: keys, Store: st, Registry: reg}, nil
}

// newRegistry returns a registry with the Go and process collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

func (a *app) Close() { _ = a.Redis.Close() }

// multiHostURL turns the documented multi-host forms,
// redis-sentinel://[auth@]host:port[,host:port...]/db?master=name and
// redis-cluster://[auth@]host:port[,host:port...], into go-redis's own
// (redis://[auth@]host:port/db?addr=host:port&...): the first host in
// the authority, the others as addr parameters, and master renamed
// master_name. go-redis's form (?addr=..., ?master_name=...) passes
// through unchanged.
func multiHostURL(rest string) (string, error) {
	authority, tail := rest, ""
	if i := strings.IndexAny(rest, "/?"); i >= 0 {
		authority, tail = rest[:i], rest[i:]
	}
	userinfo := ""
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		userinfo, authority = authority[:i+1], authority[i+1:]
	}
	hosts := strings.Split(authority, ",")
	for _, h := range hosts {
		if _, _, err := net.SplitHostPort(h); err != nil || h == "" {
			return "", fmt.Errorf("%s: %q is not host:port (use host:port[,host:port...])", envRedisURL, h)
		}
	}
	path, query := tail, ""
	if i := strings.Index(tail, "?"); i >= 0 {
		path, query = tail[:i], tail[i+1:]
	}
	q, err := url.ParseQuery(query)
	if err != nil {
		return "", fmt.Errorf("%s: malformed query: %v", envRedisURL, err)
	}
	if m := q.Get("master"); m != "" {
		if q.Get("master_name") != "" {
			return "", fmt.Errorf("%s: give master or master_name, not both", envRedisURL)
		}
		q.Set("master_name", m)
		q.Del("master")
	}
	for _, h := range hosts[1:] {
		q.Add("addr", h)
	}
	out := "redis://" + userinfo + hosts[0] + path
	if len(q) > 0 {
		out += "?" + q.Encode()
	}
	return out, nil
}

// parseFailover parses a redis-sentinel:// URL (rest is what follows the
// scheme) and insists on a master name.
func parseFailover(rest string) (*redis.FailoverOptions, error) {
	u, err := multiHostURL(rest)
	if err != nil {
		return nil, err
	}
	opt, err := redis.ParseFailoverURL(u)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", envRedisURL, redactURLErr(err))
	}
	if opt.MasterName == "" {
		return nil, fmt.Errorf("%s: a redis-sentinel:// URL needs ?master=<name>", envRedisURL)
	}
	return opt, nil
}

// parseCluster parses a redis-cluster:// URL (rest follows the scheme).
func parseCluster(rest string) (*redis.ClusterOptions, error) {
	u, err := multiHostURL(rest)
	if err != nil {
		return nil, err
	}
	opt, err := redis.ParseClusterURL(u)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", envRedisURL, redactURLErr(err))
	}
	return opt, nil
}

// asynqConnOpt turns REDIS_URL into the connection option asynqmon needs
// (it makes its own client).
func asynqConnOpt(raw string) (asynq.RedisConnOpt, error) {
	if rest, ok := strings.CutPrefix(raw, "redis-cluster://"); ok {
		opt, err := parseCluster(rest)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", envRedisURL, redactURLErr(err))
		}
		return asynq.RedisClusterClientOpt{Addrs: opt.Addrs, Username: opt.Username, Password: opt.Password, TLSConfig: opt.TLSConfig}, nil
	}
	if rest, ok := strings.CutPrefix(raw, "redis-sentinel://"); ok {
		opt, err := parseFailover(rest)
		if err != nil {
			return nil, err
		}
		return asynq.RedisFailoverClientOpt{MasterName: opt.MasterName, SentinelAddrs: opt.SentinelAddrs,
			SentinelPassword: opt.SentinelPassword, Username: opt.Username, Password: opt.Password, DB: opt.DB, TLSConfig: opt.TLSConfig}, nil
	}
	opt, err := redis.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", envRedisURL, redactURLErr(err))
	}
	return asynq.RedisClientOpt{Network: opt.Network, Addr: opt.Addr, Username: opt.Username, Password: opt.Password, DB: opt.DB, TLSConfig: opt.TLSConfig}, nil
}

// openRedis parses REDIS_URL into a UniversalClient: one Redis, Sentinel
// (redis-sentinel://[:pw@]host:port[,host:port]/db?master=name) or Cluster
// (redis-cluster://[:pw@]host:port[,host:port]). The client honours
// context deadlines (go-redis ignores them by default and waits for its
// own read timeout on every command), so a request's deadline bounds it.
func openRedis(raw string) (redis.UniversalClient, error) {
	switch {
	case strings.HasPrefix(raw, "redis-cluster://"):
		opt, err := parseCluster(strings.TrimPrefix(raw, "redis-cluster://"))
		if err != nil {
			return nil, err
		}
		opt.ContextTimeoutEnabled = true
		return redis.NewClusterClient(opt), nil
	case strings.HasPrefix(raw, "redis-sentinel://"):
		opt, err := parseFailover(strings.TrimPrefix(raw, "redis-sentinel://"))
		if err != nil {
			return nil, err
		}
		opt.ContextTimeoutEnabled = true
		return redis.NewFailoverClient(opt), nil
	}
	opt, err := redis.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", envRedisURL, redactURLErr(err))
	}
	opt.ContextTimeoutEnabled = true
	return redis.NewClient(opt), nil
}

// redactURLErr keeps the reason of a URL parse error but not the URL, which
// may hold a password.
func redactURLErr(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return "not a valid Redis URL (" + msg + ")"
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want json or text", format)
}

// serveOps serves /metrics, /healthz and /readyz (ready when ready returns
// nil) plus any extra routes on addr until ctx is done. It returns once the
// listener is bound, with a channel that reports the server's end.
func serveOps(ctx context.Context, addr string, reg *prometheus.Registry, ready func(context.Context) error, logger *slog.Logger, extra func(*http.ServeMux)) (net.Addr, <-chan error, error) {
	ln, err := listen(addr)
	if err != nil {
		return nil, nil, err
	}
	return ln.Addr(), serveOpsOn(ctx, ln, reg, ready, logger, extra), nil
}

// listen binds addr with an error that says what to do when it is taken.
func listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("address %s is already in use (another vaultfleet running?): pick another with --addr", addr)
		}
		return nil, fmt.Errorf("listen on %s: %v", addr, err)
	}
	return ln, nil
}

// Limits of every HTTP server the binary runs (API, monitor, status page,
// /metrics, /healthz, /readyz). No route streams: every response is
// short, so one write timeout fits all. A route that ever needs a long
// response (server-sent events, a large download) extends its own write
// deadline with http.ResponseController.SetWriteDeadline.
const (
	// httpReadHeaderTimeout bounds reading a request's headers.
	httpReadHeaderTimeout = 10 * time.Second
	// httpReadTimeout bounds reading a whole request, body included: a
	// client that declares a body and never sends it is cut off.
	httpReadTimeout = 15 * time.Second
	// httpWriteTimeout bounds handling a request and writing the response.
	httpWriteTimeout = 30 * time.Second
	// httpIdleTimeout closes a keep-alive connection that idles that long.
	httpIdleTimeout = 60 * time.Second
	// readyTimeout bounds the check of /readyz: a stalled Redis is
	// reported (503) within about a second.
	readyTimeout = time.Second
)

// httpLimits are the server timeouts; serverLimits holds the ones in use
// (tests shorten them).
type httpLimits struct {
	readHeader, read, write, idle time.Duration
}

var serverLimits = httpLimits{readHeader: httpReadHeaderTimeout, read: httpReadTimeout,
	write: httpWriteTimeout, idle: httpIdleTimeout}

// serveOpsOn is serveOps on a listener the caller bound.
func serveOpsOn(ctx context.Context, ln net.Listener, reg *prometheus.Registry, ready func(context.Context) error, logger *slog.Logger, extra func(*http.ServeMux)) <-chan error {
	return startServer(ctx, ln, opsMux(reg, ready, extra), logger)
}

// opsMux routes /metrics, /healthz, /readyz and the extra routes.
func opsMux(reg *prometheus.Registry, ready func(context.Context) error, extra func(*http.ServeMux)) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		rctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		defer cancel()
		if err := ready(rctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	if extra != nil {
		extra(mux)
	}
	return mux
}

// startServer serves h on ln with serverLimits until ctx is done.
func startServer(ctx context.Context, ln net.Listener, h http.Handler, logger *slog.Logger) <-chan error {
	l := serverLimits
	srv := &http.Server{Handler: closeOnRefusal(h), ReadHeaderTimeout: l.readHeader, ReadTimeout: l.read,
		WriteTimeout: l.write, IdleTimeout: l.idle}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			logger.Warn("http shutdown", slog.String("error", err.Error()))
		}
	}()
	return done
}

// closeOnRefusal closes the connection after an error response (4xx) to a
// request that declared a body, without reading the body. Otherwise
// net/http reads up to 256 kB of the unread body after the handler
// returns, to reuse the connection: an unauthenticated client that declared
// a body and sends nothing would hold the connection until the read
// timeout, and one that sends it would have it read although the request
// was refused.
func closeOnRefusal(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength == 0 {
			h.ServeHTTP(w, r)
			return
		}
		rw := &refusalWriter{ResponseWriter: w}
		h.ServeHTTP(rw, r)
		if rw.refused {
			// The response is flushed before the server drains the
			// body; a read deadline in the past makes the drain fail at
			// once, and the connection (marked close) is closed.
			_ = http.NewResponseController(w).SetReadDeadline(time.Now())
		}
	})
}

type refusalWriter struct {
	http.ResponseWriter
	wrote, refused bool
}

func (w *refusalWriter) WriteHeader(code int) {
	if !w.wrote && code >= 400 && code < 500 {
		w.Header().Set("Connection", "close")
		w.refused = true
	}
	w.wrote = true
	w.ResponseWriter.WriteHeader(code)
}

func (w *refusalWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *refusalWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Flush passes flushes through to the connection's writer.
func (w *refusalWriter) Flush() {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

// redisReady is the /readyz check of a process that needs Redis.
func redisReady(rdb redis.UniversalClient) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := rdb.Ping(ctx).Err(); err != nil {
			return errors.New("redis unreachable")
		}
		return nil
	}
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
