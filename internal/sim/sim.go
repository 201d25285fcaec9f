package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"time"
)

// Provider ids, the same as the catalog's integration ids.
const (
	Salesforce = "salesforce"
	BambooHR   = "bamboohr"
	Xero       = "xero"
	Pipedrive  = "pipedrive"
)

// ProviderIDs returns the simulated providers (a fresh slice).
func ProviderIDs() []string { return []string{Salesforce, BambooHR, Xero, Pipedrive} }

// ErrUnknownProvider means no simulated provider has the given id, or it
// does not issue the kind of credential asked for.
var ErrUnknownProvider = errors.New("sim: unknown provider")

// ErrUnknownCredential means Revoke was given a credential the provider
// never issued.
var ErrUnknownCredential = errors.New("sim: unknown credential")

// DefaultSpeed is the Speed used when Config.Speed is zero.
const DefaultSpeed = 1

const shutdownTimeout = 2 * time.Second

// Timings are the simulated providers' durations at Speed 1, tuned for
// watching `vaultfleet dev`. The zero value of a field takes the value of
// DefaultTimings.
//
// The access token lifetimes stay a few minutes long, so that the refresh
// window (min(10m, 20% of the lifetime), or the catalog's, at most half)
// leaves a freshly refreshed token alone for a while, and RefreshWindow
// stays above state.ExpirySkew, so that tokens are refreshed before they
// count as expired. Speeds above 1 shrink these margins: they are for tests.
type Timings struct {
	// SalesforceTokenTTL is how long a Salesforce access token lives
	// (real: the org's session timeout, 2h by default). Token responses do
	// not say it: the dev catalog's token_lifetime does.
	SalesforceTokenTTL time.Duration
	// XeroTokenTTL is how long a Xero access token lives, sent as
	// expires_in (real: 1800s).
	XeroTokenTTL time.Duration
	// XeroGrace is how long a used Xero refresh token stays usable (real:
	// 30 minutes).
	XeroGrace time.Duration
	// RevokeAfter is when the demo refresh tokens marked for revocation
	// are revoked, counted from Seed.
	RevokeAfter time.Duration
	// KeyRevokeAfter is when the demo API keys marked for revocation are
	// revoked, counted from Seed.
	KeyRevokeAfter time.Duration
	// OutageStart is when the flaky provider's first outage begins,
	// counted from Start; later ones begin every OutageEvery and last
	// OutageFor.
	OutageStart time.Duration
	OutageEvery time.Duration
	OutageFor   time.Duration
	// CallableEvery, InvalidEvery and AddedEvery are the dev catalog's
	// check intervals by state.
	CallableEvery time.Duration
	InvalidEvery  time.Duration
	AddedEvery    time.Duration
	// RefreshWindow is the dev catalog's refresh_window of the OAuth
	// integrations.
	RefreshWindow time.Duration
	// ConfirmSpacing is the dev catalog's confirm_spacing (Xero confirms an
	// invalid verdict once).
	ConfirmSpacing time.Duration
}

// DefaultTimings are the timings at Speed 1.
var DefaultTimings = Timings{
	SalesforceTokenTTL: 4 * time.Minute,
	XeroTokenTTL:       4 * time.Minute,
	XeroGrace:          time.Minute,
	RevokeAfter:        40 * time.Second,
	KeyRevokeAfter:     45 * time.Second,
	OutageStart:        15 * time.Second,
	OutageEvery:        time.Minute,
	OutageFor:          15 * time.Second,
	CallableEvery:      20 * time.Second,
	InvalidEvery:       30 * time.Second,
	AddedEvery:         10 * time.Second,
	RefreshWindow:      75 * time.Second,
	ConfirmSpacing:     10 * time.Second,
}

// Config configures Start. The zero value works.
type Config struct {
	// Speed divides every timing: 2 makes tokens expire, credentials get
	// revoked and outages come twice as fast. If zero, DefaultSpeed (1):
	// the Timings as given.
	Speed float64
	// Timings at Speed 1. Zero fields take DefaultTimings' values.
	Timings Timings
	// RandSeed seeds the tokens, keys and outage answers. If zero, a
	// random seed.
	RandSeed uint64
	// Logger, if nil, discards. Requests are logged at debug level,
	// outages and revocations at info; never a credential.
	Logger *slog.Logger
	// NowFunc is the clock every expiry, revocation and outage is measured
	// with. If nil, time.Now.
	NowFunc func() time.Time
}

// WithDefaults returns c with defaults applied.
func (c Config) WithDefaults() Config {
	if c.Speed == 0 {
		c.Speed = DefaultSpeed
	}
	d := DefaultTimings
	t := &c.Timings
	for _, f := range []struct{ v, def *time.Duration }{
		{&t.SalesforceTokenTTL, &d.SalesforceTokenTTL}, {&t.XeroTokenTTL, &d.XeroTokenTTL},
		{&t.XeroGrace, &d.XeroGrace}, {&t.RevokeAfter, &d.RevokeAfter},
		{&t.KeyRevokeAfter, &d.KeyRevokeAfter}, {&t.OutageStart, &d.OutageStart},
		{&t.OutageEvery, &d.OutageEvery}, {&t.OutageFor, &d.OutageFor},
		{&t.CallableEvery, &d.CallableEvery}, {&t.InvalidEvery, &d.InvalidEvery},
		{&t.AddedEvery, &d.AddedEvery}, {&t.RefreshWindow, &d.RefreshWindow},
		{&t.ConfirmSpacing, &d.ConfirmSpacing},
	} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	if c.RandSeed == 0 {
		c.RandSeed = rand.Uint64() | 1
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	return c
}

func (c Config) validate() error {
	if c.Speed < 0 || math.IsNaN(c.Speed) || math.IsInf(c.Speed, 0) {
		return fmt.Errorf("sim: speed %v must be a positive number", c.Speed)
	}
	t := c.Timings
	for name, d := range map[string]time.Duration{
		"SalesforceTokenTTL": t.SalesforceTokenTTL, "XeroTokenTTL": t.XeroTokenTTL,
		"XeroGrace": t.XeroGrace, "RevokeAfter": t.RevokeAfter, "KeyRevokeAfter": t.KeyRevokeAfter,
		"OutageStart": t.OutageStart, "OutageEvery": t.OutageEvery, "OutageFor": t.OutageFor,
		"CallableEvery": t.CallableEvery, "InvalidEvery": t.InvalidEvery, "AddedEvery": t.AddedEvery,
		"RefreshWindow": t.RefreshWindow, "ConfirmSpacing": t.ConfirmSpacing,
	} {
		if d < 0 {
			return fmt.Errorf("sim: timings: %s must not be negative", name)
		}
	}
	if t.OutageFor >= t.OutageEvery {
		return fmt.Errorf("sim: timings: OutageFor (%v) must be shorter than OutageEvery (%v)", t.OutageFor, t.OutageEvery)
	}
	return nil
}

// scaled divides every timing by speed.
func (t Timings) scaled(speed float64) Timings {
	s := func(d time.Duration) time.Duration { return time.Duration(float64(d) / speed) }
	return Timings{
		SalesforceTokenTTL: s(t.SalesforceTokenTTL), XeroTokenTTL: s(t.XeroTokenTTL),
		XeroGrace: s(t.XeroGrace), RevokeAfter: s(t.RevokeAfter), KeyRevokeAfter: s(t.KeyRevokeAfter),
		OutageStart: s(t.OutageStart), OutageEvery: s(t.OutageEvery), OutageFor: s(t.OutageFor),
		CallableEvery: s(t.CallableEvery), InvalidEvery: s(t.InvalidEvery), AddedEvery: s(t.AddedEvery),
		RefreshWindow: s(t.RefreshWindow), ConfirmSpacing: s(t.ConfirmSpacing),
	}
}

// Providers are the running simulated providers.
type Providers struct {
	cfg   Config
	t     Timings // scaled
	log   *slog.Logger
	start time.Time

	rngMu sync.Mutex
	rng   *rand.Rand

	sf     *oauthProvider
	xero   *oauthProvider
	bamboo *keyProvider
	flaky  *keyProvider
	all    []*server

	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
	done      chan struct{}
}

// server is one provider's HTTP listener and its counters.
type server struct {
	id    string
	url   string
	ln    net.Listener
	srv   *http.Server
	stats counters
}

// Start starts the simulated providers on loopback listeners. They stop
// when ctx is done or Close is called.
func Start(ctx context.Context, cfg Config) (*Providers, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	p := &Providers{
		cfg:   cfg,
		t:     cfg.Timings.scaled(cfg.Speed),
		log:   cfg.Logger,
		start: cfg.NowFunc(),
		rng:   rand.New(rand.NewPCG(cfg.RandSeed, cfg.RandSeed^0x9e3779b97f4a7c15)),
		done:  make(chan struct{}),
	}
	p.sf = newSalesforce(p)
	p.xero = newXero(p)
	p.bamboo = newBambooHR(p)
	p.flaky = newPipedrive(p)
	for _, s := range []struct {
		id string
		h  func() http.Handler
	}{
		{Salesforce, p.sf.handler}, {BambooHR, p.bamboo.handler},
		{Xero, p.xero.handler}, {Pipedrive, p.flaky.handler},
	} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			for _, s := range p.all {
				_ = s.ln.Close()
			}
			return nil, fmt.Errorf("sim: listen for %s: %w", s.id, err)
		}
		srv := &server{id: s.id, url: "http://" + ln.Addr().String(), ln: ln}
		p.byID(s.id).srv = srv
		srv.srv = &http.Server{
			Handler:           s.h(),
			ReadHeaderTimeout: 5 * time.Second,
			ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		}
		p.all = append(p.all, srv)
	}
	for _, s := range p.all {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				p.log.Error("simulated provider stopped", slog.String("provider", s.id), slog.String("error", err.Error()))
			}
		}()
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		select {
		case <-ctx.Done():
			p.closeServers()
		case <-p.done:
		}
	}()
	for _, s := range p.all {
		p.log.Info("simulated provider listening", slog.String("provider", s.id), slog.String("url", s.url))
	}
	return p, nil
}

// Close stops the servers and waits for them. It is safe to call more
// than once and after ctx is done.
func (p *Providers) Close() error {
	p.closeServers()
	p.wg.Wait()
	return p.closeErr
}

func (p *Providers) closeServers() {
	p.closeOnce.Do(func() {
		close(p.done)
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		var errs []error
		for _, s := range p.all {
			if err := s.srv.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("sim: %s: %w", s.id, err))
				_ = s.srv.Close()
			}
		}
		p.closeErr = errors.Join(errs...)
	})
}

// holder is what every provider kind has: its server.
type holder struct{ srv *server }

func (p *Providers) byID(id string) *holder {
	switch id {
	case Salesforce:
		return &p.sf.holder
	case Xero:
		return &p.xero.holder
	case BambooHR:
		return &p.bamboo.holder
	case Pipedrive:
		return &p.flaky.holder
	}
	return nil
}

// BaseURL returns a provider's base URL, e.g. "http://127.0.0.1:41234", or
// "" for an unknown id.
func (p *Providers) BaseURL(provider string) string {
	if h := p.byID(provider); h != nil {
		return h.srv.url
	}
	return ""
}

// Timings returns the timings in effect (divided by Speed).
func (p *Providers) Timings() Timings { return p.t }

// ClientEnv returns the OAuth client credentials of the simulated
// providers under the environment variable names the dev catalog names
// (SALESFORCE_CLIENT_ID, ...), for the worker's Getenv.
func (p *Providers) ClientEnv() map[string]string {
	return map[string]string{
		envSalesforceID: p.sf.clientID, envSalesforceSecret: p.sf.clientSecret,
		envXeroID: p.xero.clientID, envXeroSecret: p.xero.clientSecret,
	}
}

// StartOutage makes the flaky provider (pipedrive) answer 5xx and 429
// from now on for d, on top of its regular outage windows.
func (p *Providers) StartOutage(d time.Duration) { p.flaky.forceOutage(p.now().Add(d)) }

// Revoke revokes a credential now: an API key (bamboohr, pipedrive), or
// the grant behind an OAuth refresh token (salesforce, xero), whose next
// refresh answers invalid_grant. Access tokens already issued keep working
// until they expire.
func (p *Providers) Revoke(provider, credential string) error {
	switch provider {
	case Salesforce, Xero:
		return p.oauth(provider).revoke(credential, p.now())
	case BambooHR, Pipedrive:
		return p.keys(provider).revoke(credential, p.now())
	}
	return fmt.Errorf("%w: %q", ErrUnknownProvider, provider)
}

func (p *Providers) oauth(provider string) *oauthProvider {
	switch provider {
	case Salesforce:
		return p.sf
	case Xero:
		return p.xero
	}
	return nil
}

func (p *Providers) keys(provider string) *keyProvider {
	switch provider {
	case BambooHR:
		return p.bamboo
	case Pipedrive:
		return p.flaky
	}
	return nil
}

func (p *Providers) now() time.Time { return p.cfg.NowFunc() }

// randString returns n random characters from alphabet.
func (p *Providers) randString(n int, alphabet string) string {
	p.rngMu.Lock()
	defer p.rngMu.Unlock()
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[p.rng.IntN(len(alphabet))]
	}
	return string(b)
}

// randFloat returns a random number in [0, 1).
func (p *Providers) randFloat() float64 {
	p.rngMu.Lock()
	defer p.rngMu.Unlock()
	return p.rng.Float64()
}

const (
	alnum  = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	lowHex = "0123456789abcdef"
	b64url = alnum + "-_"
)

// uuid returns a random version-4 style UUID.
func (p *Providers) uuid() string {
	h := p.randString(32, lowHex)
	return h[0:8] + "-" + h[8:12] + "-4" + h[13:16] + "-a" + h[17:20] + "-" + h[20:32]
}
