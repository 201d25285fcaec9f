package sim

import (
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"sync"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/httpx"
)

// Endpoints, as counted in Stats.
const (
	EndpointCheck = "check"
	EndpointToken = "token"
	EndpointOther = "other"
)

// Call is one cell of the per-endpoint counts: an endpoint and the status
// it answered.
type Call struct {
	Endpoint string
	Status   int
}

// ProviderStats counts what one simulated provider did.
type ProviderStats struct {
	// Checks counts requests to the check endpoint; ChecksOK the 2xx ones;
	// ChecksRejected the 401, 403 and 404 ones (credentials or settings
	// rejected).
	Checks         int64
	ChecksOK       int64
	ChecksRejected int64
	// Refreshes counts requests to the token endpoint; Rotations the ones
	// that issued new tokens (every successful refresh rotates the refresh
	// token); InvalidGrants the ones refused with invalid_grant (a revoked,
	// reused or unknown refresh token).
	Refreshes     int64
	Rotations     int64
	InvalidGrants int64
	// Revocations counts the credentials revoked so far (revocations due
	// by now, scheduled or by Revoke).
	Revocations int64
	// ServerErrors counts 5xx answers, Throttled 429 answers, on any
	// endpoint.
	ServerErrors int64
	Throttled    int64
	// Calls counts answers by endpoint and status.
	Calls map[Call]int64
}

// Stats counts what the simulated providers did, by provider id.
type Stats map[string]ProviderStats

// Total sums the counts of every provider.
func (s Stats) Total() ProviderStats {
	t := ProviderStats{Calls: map[Call]int64{}}
	for _, p := range s {
		t.Checks += p.Checks
		t.ChecksOK += p.ChecksOK
		t.ChecksRejected += p.ChecksRejected
		t.Refreshes += p.Refreshes
		t.Rotations += p.Rotations
		t.InvalidGrants += p.InvalidGrants
		t.Revocations += p.Revocations
		t.ServerErrors += p.ServerErrors
		t.Throttled += p.Throttled
		for k, v := range p.Calls {
			t.Calls[k] += v
		}
	}
	return t
}

// String is a one-line summary for a terminal.
func (s ProviderStats) String() string {
	return fmt.Sprintf("checks %d (ok %d, rejected %d, 5xx %d, 429 %d), refreshes %d (rotated %d, invalid_grant %d), revoked %d",
		s.Checks, s.ChecksOK, s.ChecksRejected, s.ServerErrors, s.Throttled,
		s.Refreshes, s.Rotations, s.InvalidGrants, s.Revocations)
}

// Stats returns what every provider did so far.
func (p *Providers) Stats() Stats {
	now := p.now()
	out := make(Stats, len(p.all))
	for _, s := range p.all {
		ps := s.stats.snapshot()
		switch s.id {
		case Salesforce, Xero:
			ps.Revocations = p.oauth(s.id).revocations(now)
		case BambooHR, Pipedrive:
			ps.Revocations = p.keys(s.id).revocations(now)
		}
		out[s.id] = ps
	}
	return out
}

// counters are one provider's counts.
type counters struct {
	mu            sync.Mutex
	calls         map[Call]int64
	rotations     int64
	invalidGrants int64
}

func (c *counters) add(call Call) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.calls == nil {
		c.calls = map[Call]int64{}
	}
	c.calls[call]++
}

func (c *counters) rotated() {
	c.mu.Lock()
	c.rotations++
	c.mu.Unlock()
}

func (c *counters) invalidGrant() {
	c.mu.Lock()
	c.invalidGrants++
	c.mu.Unlock()
}

func (c *counters) snapshot() ProviderStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := ProviderStats{Calls: maps.Clone(c.calls), Rotations: c.rotations, InvalidGrants: c.invalidGrants}
	if s.Calls == nil {
		s.Calls = map[Call]int64{}
	}
	for k, v := range c.calls {
		switch k.Endpoint {
		case EndpointCheck:
			s.Checks += v
			switch {
			case k.Status >= 200 && k.Status < 300:
				s.ChecksOK += v
			case k.Status == http.StatusUnauthorized || k.Status == http.StatusForbidden || k.Status == http.StatusNotFound:
				s.ChecksRejected += v
			}
		case EndpointToken:
			s.Refreshes += v
		}
		switch {
		case k.Status >= 500:
			s.ServerErrors += v
		case k.Status == http.StatusTooManyRequests:
			s.Throttled += v
		}
	}
	return s
}

// route registers h on mux for pattern, counted as endpoint.
func (s *server) route(p *Providers, mux *http.ServeMux, pattern, endpoint string, h http.HandlerFunc) {
	mux.Handle(pattern, s.counted(p, endpoint, h))
}

// counted counts and logs every answer of h as endpoint.
func (s *server) counted(p *Providers, endpoint string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := httpx.NewStatusWriter(w)
		h.ServeHTTP(sw, r)
		s.stats.add(Call{Endpoint: endpoint, Status: sw.Status()})
		// The path only: a query may carry a credential (api_token=...).
		p.log.Debug("simulated provider answered", slog.String("provider", s.id),
			slog.String("endpoint", endpoint), slog.String("method", r.Method),
			slog.String("path", r.URL.Path), slog.Int("status", sw.Status()),
			slog.Duration("latency", time.Since(start)))
	})
}

// newMux returns a mux whose unknown routes answer 404, counted as
// EndpointOther.
func (s *server) newMux(p *Providers) *http.ServeMux {
	mux := http.NewServeMux()
	s.route(p, mux, "/", EndpointOther, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "not_found"})
	})
	return mux
}
