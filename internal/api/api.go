// Package api is the HTTP API of vaultfleet (`vaultfleet serve`): the
// Vault-style reads of connections and the writes a consumer's actions
// produce, behind bearer-token authentication.
//
// Routes (all under /v1 need a token; /openapi.yaml does not):
//
//	GET    /v1/consumers/{consumer_id}/connections
//	GET    /v1/connections?state=&service_id=&unified_api=&limit=&cursor=
//	GET    /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}
//	PUT    /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}
//	PATCH  /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}
//	DELETE /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}
//	POST   /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}/validate
//	POST   /v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}/refresh
//	GET    /openapi.yaml
//
// Beside /v1, /vault/... speaks Apideck Vault's own contract over the same
// store (vault.go lists its routes).
//
// The OpenAPI document (openapi.yaml, embedded) describes every route,
// body and status. Every error has one envelope,
// {"error":{"code":"...","message":"..."}}, and no response ever carries a
// credential value: a connection shows which credential fields are set,
// never what they hold.
package api

import (
	"context"
	_ "embed"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/state"
)

//go:embed openapi.yaml
var openAPIDoc []byte

// OpenAPI returns the embedded OpenAPI 3 document served at /openapi.yaml.
func OpenAPI() []byte { return append([]byte(nil), openAPIDoc...) }

// Defaults of Config.
const (
	// DefaultMaxBodyBytes caps a request body (1 MiB).
	DefaultMaxBodyBytes = 1 << 20
	// DefaultListLimit is the page size of GET /v1/connections without limit.
	DefaultListLimit = 100
	// MaxListLimit is the largest page size a caller may ask for.
	MaxListLimit = 1000
	// DefaultNotifyTimeout bounds the Notifier call after a write.
	DefaultNotifyTimeout = 5 * time.Second
	// DefaultTokenTimeout bounds a token request of POST /vault/.../token.
	DefaultTokenTimeout = 10 * time.Second
	// DefaultRequestTimeout bounds the store and queue work of one
	// request: a stalled Redis gets a 503 within it, not a hung request.
	DefaultRequestTimeout = 3 * time.Second
)

// Store is what the API uses of *state.Store.
type Store interface {
	Get(ctx context.Context, ref state.Ref) (*state.Connection, error)
	ListConsumer(ctx context.Context, consumerID string) ([]*state.Connection, error)
	List(ctx context.Context, f state.Filter, cursor string, limit int) ([]*state.Connection, string, error)
	Put(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error)
	Patch(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error)
	Delete(ctx context.Context, ref state.Ref, ifVersion int64) (state.Change, error)
}

var _ Store = (*state.Store)(nil)

// Notifier enqueues what a successful write calls for (a validation after a
// credential change or an enable). scheduler.Notifier is the real one.
type Notifier interface {
	Notify(ctx context.Context, ch state.Change) error
}

// Enqueuer enqueues tasks; *asynq.Client is one.
type Enqueuer interface {
	EnqueueContext(ctx context.Context, task *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error)
}

var _ Enqueuer = (*asynq.Client)(nil)

// Config configures the handler. Store, Catalog, Notifier and Enqueuer are
// required; so is at least one token unless AllowNoAuth.
type Config struct {
	// Store reads and writes connections.
	Store Store
	// Catalog resolves integrations.
	Catalog *catalog.Catalog
	// Notifier is called after every successful write; a failure is
	// logged (the store's due indexes catch a lost enqueue).
	Notifier Notifier
	// Enqueuer enqueues the validate and refresh tasks of POST .../validate
	// and .../refresh.
	Enqueuer Enqueuer
	// Tokens are the accepted bearer tokens (auth.ParseTokens).
	Tokens *auth.Tokens
	// AllowNoAuth, with no Tokens, lets requests from loopback addresses
	// through without a token (development only). Requests from any other
	// address still get 401.
	AllowNoAuth bool
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer receives the HTTP metrics. If nil, they are not exported.
	Registerer prometheus.Registerer
	// MaxBodyBytes caps request bodies. If zero, DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// NotifyTimeout bounds a Notify call. If zero, DefaultNotifyTimeout.
	NotifyTimeout time.Duration
	// RequestTimeout is the deadline of each request's context, which
	// every store read and write and every enqueue uses (the Notifier has
	// its own, NotifyTimeout). If zero, DefaultRequestTimeout.
	RequestTimeout time.Duration
	// NowFunc is the clock health is derived at. If nil, time.Now.
	NowFunc func() time.Time
	// Getenv reads the integrations' client credentials for POST
	// /vault/.../token. If nil, os.Getenv.
	Getenv func(string) string
	// TokenHTTPClient calls token endpoints for POST /vault/.../token. If
	// nil, a client with DefaultTokenTimeout that follows no redirect.
	TokenHTTPClient *http.Client
	// Sessions signs and verifies Vault session tokens (POST
	// /vault/sessions). If nil, sessions are not offered.
	Sessions *session.Keys
	// Connect runs the OAuth connect flow (GET .../authorize, revocation
	// on disconnect). If nil, it is not offered.
	Connect Connector
	// PublicURL is the fleet's external base URL, for session_uri and
	// authorize_url.
	PublicURL string
}

func (c Config) withDefaults() Config {
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.NotifyTimeout <= 0 {
		c.NotifyTimeout = DefaultNotifyTimeout
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	if c.Getenv == nil {
		c.Getenv = os.Getenv
	}
	if c.TokenHTTPClient == nil {
		c.TokenHTTPClient = &http.Client{Timeout: DefaultTokenTimeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.Store == nil:
		return errors.New("api: Config.Store is required")
	case c.Catalog == nil:
		return errors.New("api: Config.Catalog is required")
	case c.Notifier == nil:
		return errors.New("api: Config.Notifier is required")
	case c.Enqueuer == nil:
		return errors.New("api: Config.Enqueuer is required")
	case c.Tokens == nil && !c.AllowNoAuth:
		return errors.New("api: no API token configured")
	}
	return nil
}

// server holds the handler's dependencies.
type server struct {
	cfg     Config
	metrics *metrics
	log     *slog.Logger
	// vault is Config.Store as a VaultStore, nil when /vault is not served.
	vault VaultStore
}

// route is one pattern the handler serves.
type route struct {
	method, path string
	// auth is false only for /openapi.yaml.
	auth bool
	h    http.HandlerFunc
}

// Path patterns.
const (
	pathConsumerConnections = "/v1/consumers/{consumer_id}/connections"
	pathConnections         = "/v1/connections"
	pathConnection          = "/v1/consumers/{consumer_id}/connections/{unified_api}/{service_id}"
	pathValidate            = pathConnection + "/validate"
	pathRefresh             = pathConnection + "/refresh"
	pathOpenAPI             = "/openapi.yaml"
)

func (s *server) routes() []route {
	return []route{
		{http.MethodGet, pathConsumerConnections, true, s.listConsumer},
		{http.MethodGet, pathConnections, true, s.listAll},
		{http.MethodGet, pathConnection, true, s.onConnection(s.getConnection)},
		{http.MethodPut, pathConnection, true, s.onConnection(s.putConnection)},
		{http.MethodPatch, pathConnection, true, s.onConnection(s.patchConnection)},
		{http.MethodDelete, pathConnection, true, s.onConnection(s.deleteConnection)},
		{http.MethodPost, pathValidate, true, s.onConnection(s.validateNow)},
		{http.MethodPost, pathRefresh, true, s.onConnection(s.refreshNow)},
		{http.MethodGet, pathOpenAPI, false, s.openAPI},
	}
}

// Routes lists the "METHOD /path" patterns the handler serves (for tests
// and documentation checks).
func Routes() []string {
	var out []string
	for _, r := range (&server{}).routes() {
		out = append(out, r.method+" "+r.path)
	}
	return out
}

// New returns the API handler. Mount it at /v1/, /vault/ and /openapi.yaml; it
// answers every other path with 404.
func New(cfg Config) (http.Handler, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &server{cfg: cfg, log: cfg.Logger}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	s.metrics = m

	mux := http.NewServeMux()
	allowed := map[string][]string{}
	var paths []string
	for _, r := range s.routes() {
		h := http.Handler(r.h)
		if r.auth {
			h = s.authenticate(h)
		}
		mux.Handle(r.method+" "+r.path, s.instrument(r.path, h))
		if _, ok := allowed[r.path]; !ok {
			paths = append(paths, r.path)
		}
		allowed[r.path] = append(allowed[r.path], r.method)
	}
	// A known path with another method: 405 in the envelope (after auth).
	for _, p := range paths {
		methods := allowed[p]
		if slices.Contains(methods, http.MethodGet) {
			methods = append(methods, http.MethodHead)
		}
		allow := strings.Join(methods, ", ")
		h := http.Handler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, codeMethodNotAllowed, "method not allowed; allowed: "+allow)
		}))
		if p != pathOpenAPI {
			h = s.authenticate(h)
		}
		mux.Handle(p, s.instrument(p, h))
	}
	s.mountVault(mux)
	notFound := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, codeNotFound, "no such route")
	})
	mux.Handle("/v1/", s.instrument("unmatched", s.authenticate(notFound)))
	mux.Handle("/", s.instrument("unmatched", notFound))
	return s.withDeadline(mux), nil
}

// withDeadline gives every request's context the RequestTimeout deadline.
func (s *server) withDeadline(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout)
		defer cancel()
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// authenticate requires a valid bearer token (compared in constant time
// by auth.Tokens).
func (s *server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.refuseSession(w, r) {
			return
		}
		if msg := s.checkToken(w, r); msg != "" {
			writeError(w, http.StatusUnauthorized, codeUnauthorized, msg)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// checkToken returns "" when the request may pass, else the reason, with
// the WWW-Authenticate challenge already set on w.
func (s *server) checkToken(w http.ResponseWriter, r *http.Request) string {
	if s.cfg.Tokens == nil && s.cfg.AllowNoAuth && isLoopback(r.RemoteAddr) {
		return ""
	}
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if h == "" || !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="vaultfleet"`)
		return "missing bearer token"
	}
	if !s.cfg.Tokens.Valid(strings.TrimSpace(tok)) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="vaultfleet", error="invalid_token"`)
		return "invalid bearer token"
	}
	return ""
}

func isLoopback(remoteAddr string) bool {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (s *server) openAPI(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	_, _ = w.Write(openAPIDoc)
}
