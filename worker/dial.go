package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/netguard"
)

// errAddressNotAllowed is the dial-time refusal of a check or token request
// whose host resolves to a loopback, private, link-local, metadata or
// otherwise non-public address the catalog does not list. It names no
// host (hosts come from consumers' settings) and carries no credential:
// nothing was sent.
var errAddressNotAllowed = errors.New("worker: provider host resolves to a non-public address the catalog does not list")

// lookupFunc resolves a host name to its addresses (net.Resolver's
// LookupNetIP with network "ip"); tests inject their own.
type lookupFunc func(ctx context.Context, host string) ([]netip.Addr, error)

// integrationKey is the context key under which scopedTransport puts the
// id of the integration a request is sent for.
type integrationKey struct{}

// scopedTransport tags each request with its integration, so that the
// dialer allows exactly the internal addresses that integration's catalog
// entry lists.
type scopedTransport struct {
	id    string
	inner http.RoundTripper
}

func (t scopedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.inner.RoundTrip(req.WithContext(context.WithValue(req.Context(), integrationKey{}, t.id)))
}

// guardedDialer resolves the host itself and dials only addresses that
// are public (netguard.Public) or listed as an exact IP[:port] in the
// allowed_hosts of the integration the request is for. Checking the
// resolved address, not the name, is what stops a name allowed by a
// catalog wildcard (*.zendesk.com, set by a consumer) that resolves, or is
// rebound, to 127.0.0.1, 10.x or 169.254.169.254 from receiving the
// consumer's credentials. The address checked is the address dialled: the
// name is not resolved a second time.
type guardedDialer struct {
	dialer *net.Dialer
	lookup lookupFunc
	// exact holds the IP entries of each integration's allowed_hosts;
	// any is their union, for a request carrying no integration.
	exact map[string]map[netip.AddrPort]bool
	any   map[netip.AddrPort]bool
}

func newGuardedDialer(d *net.Dialer, cat *catalog.Catalog, lookup lookupFunc) *guardedDialer {
	if lookup == nil {
		lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	g := &guardedDialer{dialer: d, lookup: lookup, exact: map[string]map[netip.AddrPort]bool{}, any: map[netip.AddrPort]bool{}}
	if cat == nil {
		return g
	}
	for _, in := range cat.Integrations {
		set := map[netip.AddrPort]bool{}
		for _, e := range in.AllowedHosts {
			for _, ap := range exactIPEntry(e, in.AllowHTTP) {
				set[ap] = true
				g.any[ap] = true
			}
		}
		g.exact[in.ID] = set
	}
	return g
}

// exactIPEntry returns the address:port pairs an allowed_hosts entry that
// is an IP literal allows: "10.0.0.5:8443", "[fd00::1]:8080", or
// "10.0.0.5" (the default port of https, and of http with allowHTTP). A
// host name or wildcard entry gives none.
func exactIPEntry(e string, allowHTTP bool) []netip.AddrPort {
	if ap, err := netip.ParseAddrPort(e); err == nil {
		return []netip.AddrPort{netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
	}
	ip, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(e, "["), "]"))
	if err != nil {
		return nil
	}
	ip = ip.Unmap()
	out := []netip.AddrPort{netip.AddrPortFrom(ip, 443)}
	if allowHTTP {
		out = append(out, netip.AddrPortFrom(ip, 80))
	}
	return out
}

// allowed reports whether ap may be dialled for the integration in ctx.
func (g *guardedDialer) allowed(ctx context.Context, ap netip.AddrPort) bool {
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if netguard.Public(ap.Addr()) {
		return true
	}
	if id, ok := ctx.Value(integrationKey{}).(string); ok {
		return g.exact[id][ap]
	}
	return g.any[ap]
}

// DialContext is http.Transport's DialContext.
func (g *guardedDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("worker: bad port in %q", address)
	}
	var ips []netip.Addr
	if ip, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{ip}
	} else {
		if ips, err = g.lookup(ctx, host); err != nil {
			return nil, err
		}
	}
	var firstErr error
	for _, ip := range ips {
		ap := netip.AddrPortFrom(ip, uint16(port))
		if !g.allowed(ctx, ap) {
			if firstErr == nil {
				firstErr = errAddressNotAllowed
			}
			continue
		}
		conn, err := g.dialer.DialContext(ctx, network, ap.String())
		if err == nil {
			return conn, nil
		}
		if firstErr == nil || errors.Is(firstErr, errAddressNotAllowed) {
			firstErr = err
		}
	}
	if firstErr == nil {
		firstErr = &net.DNSError{Err: "no addresses", Name: host, IsNotFound: true}
	}
	return nil, firstErr
}

// proxyEnv lists the variables http.ProxyFromEnvironment would read.
var proxyEnv = []string{"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"}

// warnProxyIgnored says once, at start, that a proxy configured in the
// environment is not used for checks and token exchanges: a proxy would
// resolve and dial the provider's host itself, past the address guard.
func warnProxyIgnored(getenv func(string) string, log *slog.Logger) {
	for _, k := range proxyEnv {
		if getenv(k) != "" {
			log.Warn("worker: ignoring the proxy environment for checks and token exchanges (they dial providers directly, so that internal addresses stay refused)",
				slog.String("variable", k))
			return
		}
	}
}
