// Package monitor embeds the Asynq web monitor (asynqmon) under a path of
// the fleet's HTTP server, behind the API's authentication, with payload and
// result formatters that show vaultfleet's JSON readably.
package monitor

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"strings"

	"github.com/hibiken/asynq"
	"github.com/hibiken/asynqmon"
)

// DefaultRootPath is where the monitor is mounted.
const DefaultRootPath = "/monitor"

// Config configures the monitor.
type Config struct {
	// RedisConnOpt makes the monitor's own Redis client and inspector.
	RedisConnOpt asynq.RedisConnOpt
	// RootPath, if empty, DefaultRootPath.
	RootPath string
	// ReadOnly hides the buttons that change tasks and queues and refuses
	// every request other than GET, HEAD and OPTIONS.
	ReadOnly bool
	// PrometheusAddress, when set, makes the monitor's metrics charts query
	// that Prometheus for asynq's queue metrics.
	PrometheusAddress string
	// Authorize decides whether a request may see the monitor; nil allows
	// everyone (dev on loopback without tokens only).
	Authorize func(*http.Request) bool
	// Realm is the basic-auth realm a browser shows. Default "vaultfleet".
	Realm string
}

// Handler serves the monitor.
type Handler struct {
	mon  *asynqmon.HTTPHandler
	cfg  Config
	root string
}

// New returns the monitor handler; mount it at cfg.RootPath + "/".
func New(cfg Config) (*Handler, error) {
	if cfg.RedisConnOpt == nil {
		return nil, errors.New("monitor: RedisConnOpt is required")
	}
	if cfg.RootPath == "" {
		cfg.RootPath = DefaultRootPath
	}
	if !strings.HasPrefix(cfg.RootPath, "/") {
		return nil, errors.New("monitor: RootPath must start with /")
	}
	if cfg.Realm == "" {
		cfg.Realm = "vaultfleet"
	}
	mon := asynqmon.New(asynqmon.Options{
		RootPath:          strings.TrimSuffix(cfg.RootPath, "/"),
		RedisConnOpt:      cfg.RedisConnOpt,
		PayloadFormatter:  asynqmon.PayloadFormatterFunc(formatJSON),
		ResultFormatter:   asynqmon.ResultFormatterFunc(formatJSON),
		PrometheusAddress: cfg.PrometheusAddress,
		ReadOnly:          cfg.ReadOnly,
	})
	return &Handler{mon: mon, cfg: cfg, root: strings.TrimSuffix(cfg.RootPath, "/")}, nil
}

// RootPath returns where the handler expects to be mounted.
func (h *Handler) RootPath() string { return h.root }

// ServeHTTP asks for credentials the browser can keep (basic auth, any user
// name, an API token as the password) and then serves asynqmon.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.cfg.Authorize != nil && !h.cfg.Authorize(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="`+h.cfg.Realm+`", charset="UTF-8"`)
		http.Error(w, "unauthorized: use an API token as the password", http.StatusUnauthorized)
		return
	}
	if code, msg := h.refuseWrite(r); code != 0 {
		http.Error(w, msg, code)
		return
	}
	if r.URL.Path == h.root {
		http.Redirect(w, r, h.root+"/", http.StatusMovedPermanently)
		return
	}
	h.mon.ServeHTTP(w, r)
}

// Close releases the monitor's Redis connections.
func (h *Handler) Close() error { return h.mon.Close() }

// formatJSON indents a JSON payload or result; anything else is shown as
// text. vaultfleet's payloads and results never hold secrets.
func formatJSON(_ string, b []byte) string {
	if len(b) == 0 {
		return ""
	}
	var out bytes.Buffer
	if json.Valid(b) && json.Indent(&out, b, "", "  ") == nil {
		return out.String()
	}
	return string(b)
}
