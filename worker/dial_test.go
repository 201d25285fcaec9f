package worker

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"

	"github.com/sony/gobreaker/v2"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
)

// fakeResolver maps host names to addresses, as a DNS server an attacker
// controls would (or one rebound after the catalog check).
type fakeResolver struct {
	mu      sync.Mutex
	names   map[string]string
	lookups []string
}

func (r *fakeResolver) lookup(_ context.Context, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups = append(r.lookups, host)
	if a, ok := r.names[host]; ok {
		return []netip.Addr{netip.MustParseAddr(a)}, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

// TestCheckRefusesWildcardNameResolvingInside: a name the catalog allows
// only through a wildcard, resolving to loopback, is refused at dial time:
// no request reaches the server and the consumer's API key never leaves.
// The provider's exact IP entry ("127.0.0.1:port", as every test catalog
// lists it) keeps working.
func TestCheckRefusesWildcardNameResolvingInside(t *testing.T) {
	b := setup(t)
	// An internal service on loopback the catalog does not list.
	internal := newProvider(t)
	var leaked sync.Map
	internal.handle("/inst/me", func(rw http.ResponseWriter, r *http.Request) {
		leaked.Store(r.Header.Get("X-Api-Token"), true)
		_, _ = rw.Write([]byte(`{}`))
	})
	_, port, err := net.SplitHostPort(internal.host)
	require.NoError(t, err)
	b.p.handle("/inst/me", status(200))
	// inst allows its provider's exact address and *.wild.test on the
	// internal service's port.
	b.cat = testCatalog(t, b.p.host, "*.wild.test:"+port)
	b.store = b.newStore(b.cat)
	res := &fakeResolver{names: map[string]string{
		"evil.wild.test":  "127.0.0.1",
		"alias.wild.test": "::ffff:127.0.0.1",
		"meta.wild.test":  "169.254.169.254",
		"ten.wild.test":   "10.0.0.7",
	}}
	w := b.worker(func(c *Config) {
		c.Transport = newTransport(c.ConnectTimeout, c.Concurrency, c.Catalog, res.lookup)
	})

	for _, name := range []string{"evil", "alias", "meta", "ten"} {
		id := "crm+inst"
		b.put(id, map[string]string{"api_key": secretAPIKey},
			map[string]string{"instance_url": "http://" + name + ".wild.test:" + port})
		require.NoError(t, process(t, w, validateTask(t, id)), "%s: the consumer's setting, not retried", name)
		c := b.get(id)
		require.Equal(t, state.Added, c.State, "%s: a refused dial is no verdict", name)
		require.Equal(t, state.HealthMisconfigured, c.Health, name)
		require.Contains(t, c.Transient.LastError, "non-public address", name)
		require.NotContains(t, c.Transient.LastError, secretAPIKey)
		require.Zero(t, internal.total(), "%s: the request reached the internal service", name)
	}
	res.mu.Lock()
	require.Contains(t, res.lookups, "evil.wild.test", "the guard resolved the name itself")
	res.mu.Unlock()
	// A consumer's setting is no provider trouble: however many refused
	// dials, the integration's breaker stays closed.
	b.put("crm+inst", map[string]string{"api_key": secretAPIKey},
		map[string]string{"instance_url": "http://evil.wild.test:" + port})
	for range 2 * defaultBreakerMinReqs {
		require.NoError(t, process(t, w, validateTask(t, "crm+inst")))
	}
	require.Equal(t, gobreaker.StateClosed, w.breakers.state("inst"))
	leaked.Range(func(k, _ any) bool {
		t.Fatalf("the internal service received a credential")
		return false
	})

	// The exact IP the catalog lists is allowed.
	b.put("crm+inst", map[string]string{"api_key": secretAPIKey}, map[string]string{"instance_url": "http://" + b.p.host})
	require.NoError(t, process(t, w, validateTask(t, "crm+inst")))
	require.Equal(t, 1, b.p.count("/inst/me"))
	require.Equal(t, state.Callable, b.get("crm+inst").State)
	requireNoSecrets(t, b.logs.String())
}

// TestGuardedDialerScopesExactIPsToTheirIntegration: an internal address
// one integration lists is no opening for another integration's requests.
func TestGuardedDialerScopesExactIPsToTheirIntegration(t *testing.T) {
	p := newProvider(t)
	p.handle("/x", status(200))
	cat := testCatalog(t, p.host)
	_, port, _ := net.SplitHostPort(p.host)
	res := &fakeResolver{names: map[string]string{"name.example.com": "127.0.0.1"}}
	tr := newTransport(defaultConnectTimeout, 1, cat, res.lookup)
	defer tr.CloseIdleConnections()
	get := func(id, url string) error {
		c := &http.Client{Transport: scopedTransport{id: id, inner: tr}}
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	in, ok := cat.Get("acme")
	require.True(t, ok)
	require.Contains(t, in.AllowedHosts, p.host)
	require.NoError(t, get("acme", "http://"+p.host+"/x"))
	require.NoError(t, get("acme", "http://name.example.com:"+port+"/x"), "the listed IP through a name")
	// An integration absent from the catalog lists nothing. (Pooled
	// connections are keyed by host name, not integration: close them so
	// that this request dials.)
	tr.CloseIdleConnections()
	err := get("nosuch", "http://name.example.com:"+port+"/x")
	require.True(t, errors.Is(err, errAddressNotAllowed), "%v", err)
	require.Equal(t, 2, p.count("/x"))
	// Another port on the listed IP is not listed.
	err = get("acme", "http://127.0.0.1:1/x")
	require.True(t, errors.Is(err, errAddressNotAllowed), "%v", err)
}

func TestNewTransportIgnoresProxyEnvironment(t *testing.T) {
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:9")
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:9")
	tr := newTransport(defaultConnectTimeout, 1, nil, nil)
	require.Nil(t, tr.Proxy, "a proxy would dial providers itself, past the address guard")
	b := setup(t)
	b.worker(func(c *Config) {
		c.Getenv = func(k string) string {
			if k == "HTTPS_PROXY" {
				return "http://proxy.internal:3128"
			}
			return ""
		}
	})
	require.Contains(t, b.logs.String(), "ignoring the proxy environment")
	require.Contains(t, b.logs.String(), "HTTPS_PROXY")
}
