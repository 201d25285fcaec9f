// Package ui serves the fleet's status page: connections per integration
// and state, the latest transitions with their reasons, queue depths, and
// links to the Asynq monitor and the metrics. Server-rendered HTML that
// refreshes itself; no JavaScript build step.
package ui

import (
	"context"
	_ "embed"
	"html/template"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// Store is what the page reads from the connection store.
type Store interface {
	Counts(ctx context.Context) (map[state.CountKey]int64, error)
	LatestEvents(ctx context.Context, n int64) ([]state.Event, error)
}

// Queue is the depth of one asynq queue.
type Queue struct {
	Name      string
	Pending   int
	Active    int
	Scheduled int
	Retry     int
	Archived  int
	Processed int
	Failed    int
}

// Config configures the page.
type Config struct {
	Store   Store
	Catalog *catalog.Catalog
	// QueuesFunc, if set, lists queue depths (asynq Inspector).
	QueuesFunc func(ctx context.Context) ([]Queue, error)
	// MonitorPath links to the Asynq monitor; empty hides the link.
	MonitorPath string
	// Refresh is how often the page reloads itself. Default 5s.
	Refresh time.Duration
	// Transitions is how many recent transitions to show. Default 25.
	Transitions int64
	// Authorize, if set, guards the page (basic auth with an API token).
	Authorize func(*http.Request) bool
	// Title, default "vaultfleet".
	Title  string
	Logger *slog.Logger
	// NowFunc is the clock (for "ago" columns). Default time.Now.
	NowFunc func() time.Time
}

//go:embed status.html.tmpl
var pageSrc string

var page = template.Must(template.New("status").Funcs(template.FuncMap{
	"ago": func(now, t time.Time) string {
		d := now.Sub(t).Round(time.Second)
		if d < 0 {
			d = 0
		}
		return d.String()
	},
}).Parse(pageSrc))

// Handler serves the status page at "/".
type Handler struct{ cfg Config }

// New returns the status page handler.
func New(cfg Config) *Handler {
	if cfg.Refresh <= 0 {
		cfg.Refresh = 5 * time.Second
	}
	if cfg.Transitions <= 0 {
		cfg.Transitions = 25
	}
	if cfg.Title == "" {
		cfg.Title = "vaultfleet"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	return &Handler{cfg: cfg}
}

type row struct {
	ID, Name, UnifiedAPI, Status string
	Counts                       []int64
	Total                        int64
}

type view struct {
	Title        string
	RefreshSecs  int
	Now          time.Time
	States       []state.State
	Rows         []row
	Totals       []int64
	Total        int64
	Transitions  []state.Event
	Queues       []Queue
	MonitorPath  string
	Errors       []string
	GeneratedFor string
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	if h.cfg.Authorize != nil && !h.cfg.Authorize(r) {
		w.Header().Set("WWW-Authenticate", `Basic realm="vaultfleet", charset="UTF-8"`)
		http.Error(w, "unauthorized: use an API token as the password", http.StatusUnauthorized)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
	defer cancel()
	v := h.build(ctx)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := page.Execute(w, v); err != nil {
		h.cfg.Logger.Warn("status page render", slog.String("error", err.Error()))
	}
}

// stored states: available is never stored, so the table shows the rest.
var shownStates = []state.State{state.Added, state.Authorized, state.Invalid, state.Callable}

func (h *Handler) build(ctx context.Context) view {
	v := view{
		Title: h.cfg.Title, RefreshSecs: int(h.cfg.Refresh / time.Second), Now: h.cfg.NowFunc(),
		States: shownStates, MonitorPath: h.cfg.MonitorPath, Totals: make([]int64, len(shownStates)),
	}
	if v.RefreshSecs < 1 {
		v.RefreshSecs = 1
	}
	counts, err := h.cfg.Store.Counts(ctx)
	if err != nil {
		v.Errors = append(v.Errors, "counts unavailable: "+err.Error())
	}
	for _, in := range h.cfg.Catalog.Integrations {
		rw := row{ID: in.ID, Name: in.Name, UnifiedAPI: in.UnifiedAPI, Status: string(in.Status), Counts: make([]int64, len(shownStates))}
		for i, s := range shownStates {
			n := counts[state.CountKey{ServiceID: in.ID, State: s}]
			rw.Counts[i] = n
			rw.Total += n
			v.Totals[i] += n
		}
		v.Total += rw.Total
		v.Rows = append(v.Rows, rw)
	}
	slices.SortStableFunc(v.Rows, func(a, b row) int { return int(b.Total - a.Total) })
	evs, err := h.cfg.Store.LatestEvents(ctx, h.cfg.Transitions)
	if err != nil {
		v.Errors = append(v.Errors, "transitions unavailable: "+err.Error())
	}
	v.Transitions = evs
	if h.cfg.QueuesFunc != nil {
		qs, err := h.cfg.QueuesFunc(ctx)
		if err != nil {
			v.Errors = append(v.Errors, "queues unavailable: "+err.Error())
		}
		v.Queues = qs
	}
	return v
}
