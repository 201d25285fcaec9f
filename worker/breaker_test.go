package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/sony/gobreaker/v2"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// legacyStore wraps the real store: the connections of consumers named
// crlf-* read back with CR/LF in their key, as records written before
// credential values were checked on write do.
type legacyStore struct{ *state.Store }

func (s legacyStore) Get(ctx context.Context, ref state.Ref) (*state.Connection, error) {
	c, err := s.Store.Get(ctx, ref)
	if err == nil && strings.HasPrefix(ref.ConsumerID, "crlf-") {
		c.Credentials.APIKey += "\r\nX-Injected: 1"
	}
	return c, err
}

// closedAddr returns a loopback host:port where nothing listens.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// TestBreakerIgnoresConsumerMisconfiguration: 13 connections of one
// integration are misconfigured by their consumers (4 whose check the
// provider redirects to a host the catalog refuses, 3 whose stored key
// holds CR/LF, 3 whose instance host is under a wildcard the catalog
// allows but does not resolve, 3 whose instance host:port refuses
// connections) beside one healthy connection. Each misconfigured one gets
// health misconfigured on its own; the integration's breaker stays closed
// and the healthy one is checked and callable. (Before, all 13 counted as
// provider trouble, the breaker opened and the healthy check was skipped.)
func TestBreakerIgnoresConsumerMisconfiguration(t *testing.T) {
	b := setup(t)
	refused := closedAddr(t)
	b.cat = testCatalog(t, b.p.host, "*.nxdomain.invalid", refused)
	b.store = b.newStore(b.cat)
	b.p.handle("/inst/me", func(rw http.ResponseWriter, r *http.Request) {
		switch r.Header.Get("X-API-Key") {
		case "redirect-me":
			http.Redirect(rw, r, "http://evil.example.com/steal", http.StatusFound)
		case secretAPIKey:
			_, _ = rw.Write([]byte(`{"ok":true}`))
		default:
			rw.WriteHeader(http.StatusUnauthorized)
		}
	})
	w := b.worker(func(c *Config) {
		c.Store = legacyStore{b.store}
		c.BreakerMinRequests = 10
		c.BreakerFailureRatio = 0.5
	})
	ctx := context.Background()
	type conn struct {
		ref       state.Ref
		wantState state.State
	}
	var bad []conn
	add := func(prefix string, n int, key, instance func(i int) string, want state.State) {
		for i := range n {
			ref := state.Ref{ConsumerID: fmt.Sprintf("%s-%d", prefix, i), ConnectionID: "crm+inst"}
			_, err := b.store.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": key(i)},
				Settings: map[string]string{"instance_url": instance(i)}}, 0)
			require.NoError(t, err)
			bad = append(bad, conn{ref: ref, wantState: want})
		}
	}
	provider := func(int) string { return "http://" + b.p.host }
	add("redirect", 4, func(int) string { return "redirect-me" }, provider, state.Added)
	add("crlf", 3, func(int) string { return secretAPIKey }, provider, state.Invalid)
	add("nxdomain", 3, func(int) string { return secretAPIKey },
		func(i int) string { return fmt.Sprintf("http://acme-%d.nxdomain.invalid", i) }, state.Added)
	add("refused", 3, func(int) string { return secretAPIKey }, func(int) string { return "http://" + refused }, state.Added)
	require.Len(t, bad, 13)

	for _, c := range bad {
		require.NoError(t, validateRef(t, w, c.ref), "%s: the connection's own problem, nothing to retry", c.ref)
		got := b.getRef(c.ref)
		require.Equal(t, c.wantState, got.State, c.ref.String())
		require.Equal(t, state.HealthMisconfigured, got.Health, c.ref.String())
	}
	require.Equal(t, gobreaker.StateClosed, w.breakers.state("inst"))
	require.Zero(t, testutil.ToFloat64(w.metrics.circuitOpen.WithLabelValues("inst")))
	require.Equal(t, 10.0, testutil.ToFloat64(w.metrics.checks.WithLabelValues("inst", outcomeMisconfigured)))

	healthy := state.Ref{ConsumerID: "healthy", ConnectionID: "crm+inst"}
	_, err := b.store.Put(ctx, healthy, state.Input{Credentials: acmeKey(),
		Settings: map[string]string{"instance_url": "http://" + b.p.host}}, 0)
	require.NoError(t, err)
	before := b.p.count("/inst/me")
	require.NoError(t, validateRef(t, w, healthy))
	require.Equal(t, before+1, b.p.count("/inst/me"), "the healthy connection was checked")
	require.Equal(t, state.Callable, b.getRef(healthy).State)
	logs := b.logs.String()
	requireNoSecrets(t, logs)
	require.NotContains(t, logs, "X-Injected")
}

// TestBreakerOpensOnProviderTrouble: a 5xx storm on the provider's own
// host still opens the breaker, and checks stop reaching the provider.
func TestBreakerOpensOnProviderTrouble(t *testing.T) {
	b := setup(t)
	b.p.handle("/acme/me", status(500))
	w := b.worker(func(c *Config) {
		c.BreakerMinRequests = 10
		c.BreakerFailureRatio = 0.5
	})
	const n = 12
	var refs []state.Ref
	for i := range n {
		refs = append(refs, waveRef("storm", i, "acme"))
		b.putRef(state.Ref{ConsumerID: refs[i].ConsumerID, ConnectionID: "crm+acme"})
	}
	for i := range n {
		refs[i].ConnectionID = "crm+acme"
		err := validateRef(t, w, refs[i])
		require.Error(t, err)
		if i < 10 {
			require.ErrorContains(t, err, "status 500")
		} else {
			require.ErrorIs(t, err, ErrCircuitOpen)
		}
	}
	require.Equal(t, gobreaker.StateOpen, w.breakers.state("acme"))
	require.Equal(t, 10, b.p.count("/acme/me"), "no check reached the provider once the breaker opened")
	require.Equal(t, state.HealthDegraded, b.getRef(refs[0]).Health)
}

// TestConsumerSide classifies transport failures: a refused redirect is
// always the consumer's; a name that does not resolve or a refused dial is
// the consumer's only on a host its settings chose; timeouts and failures
// after connecting are the provider's.
func TestConsumerSide(t *testing.T) {
	t.Parallel()
	cat := testCatalog(t, "127.0.0.1:8080", "*.nxdomain.invalid")
	acme, inst := integ(t, cat, "acme"), integ(t, cat, "inst")
	fixed := mustURL(t, "http://127.0.0.1:8080/acme/me")
	chosen := mustURL(t, "http://acme.nxdomain.invalid/inst/me")
	notFound := &net.DNSError{Err: "no such host", Name: "acme.nxdomain.invalid", IsNotFound: true}
	dnsTimeout := &net.DNSError{Err: "i/o timeout", Name: "acme.nxdomain.invalid", IsTimeout: true}
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")}
	reset := &net.OpError{Op: "read", Net: "tcp", Err: errors.New("connection reset by peer")}
	redirect := fmt.Errorf("catalog: integration %q: redirect: %w", "acme", catalog.ErrHostNotAllowed)
	tests := []struct {
		desc string
		in   *catalog.Integration
		err  error
		want bool
	}{
		{"RedirectOnProviderHost", acme, redirect, true},
		{"NotFoundOnProviderHost", acme, notFound, false},
		{"RefusedOnProviderHost", acme, refused, false},
		{"NotFoundOnChosenHost", inst, notFound, true},
		{"RefusedOnChosenHost", inst, refused, true},
		{"DNSTimeoutOnChosenHost", inst, dnsTimeout, false},
		{"ResetOnChosenHost", inst, reset, false},
		{"DeadlineOnChosenHost", inst, context.DeadlineExceeded, false},
	}
	for _, tc := range tests {
		u := chosen
		if tc.in == acme {
			u = fixed
		}
		require.Equal(t, tc.want, consumerSide(tc.in, u, fmt.Errorf("get: %w", tc.err)), tc.desc)
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	require.NoError(t, err)
	return u
}
