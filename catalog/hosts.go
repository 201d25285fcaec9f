package catalog

import (
	"fmt"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
)

// maxRedirects is how many redirects CheckRedirect follows.
const maxRedirects = 5

// hostError is a refusal by the host rules; errors.Is matches
// ErrHostNotAllowed. Hosts are not secrets (they come from settings), so
// the message names them.
type hostError struct {
	host   string
	reason string
}

func (e *hostError) Error() string {
	if e.host == "" {
		return "host not allowed: " + e.reason
	}
	return fmt.Sprintf("host %q not allowed: %s", e.host, e.reason)
}

func (e *hostError) Is(target error) bool { return target == ErrHostNotAllowed }

func hostErr(host, format string, args ...any) error {
	return &hostError{host: host, reason: fmt.Sprintf(format, args...)}
}

// hostPort is a parsed, lower-cased host[:port].
type hostPort struct {
	host string // without brackets for IPv6
	port int    // 0: none given
	ip   bool   // an IP literal, or a form some resolvers read as one
}

var (
	dnsLabelRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// numericLabelRE matches a last label that makes resolvers (and the
	// WHATWG URL parser) read a host as an IPv4 address: 2130706433,
	// 0x7f000001, 0177.0.0.1, 127.1.
	numericLabelRE = regexp.MustCompile(`^(0x[0-9a-f]*|[0-9]+)$`)
)

// validDNSName reports whether h (lower case) is a plain DNS name: labels
// of letters, digits and inner hyphens, no trailing dot.
func validDNSName(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, l := range strings.Split(h, ".") {
		if !dnsLabelRE.MatchString(l) {
			return false
		}
	}
	return true
}

// splitHost parses a URL host (u.Host) or an allowed_hosts entry.
func splitHost(s string) (hostPort, error) {
	var hp hostPort
	if s == "" {
		return hp, hostErr(s, "empty host")
	}
	if strings.ContainsAny(s, "%\\@ \t\r\n") {
		return hp, hostErr(s, "percent-encoding, backslash, '@' or space in host")
	}
	s = strings.ToLower(s)
	var port string
	if s[0] == '[' {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return hp, hostErr(s, "unterminated IPv6 literal")
		}
		hp.host, hp.ip = s[1:end], true
		rest := s[end+1:]
		if rest != "" {
			if rest[0] != ':' {
				return hp, hostErr(s, "junk after IPv6 literal")
			}
			port = rest[1:]
			if port == "" {
				return hp, hostErr(s, "empty port")
			}
		}
		if !strings.Contains(hp.host, ":") || net.ParseIP(hp.host) == nil {
			return hp, hostErr(s, "bad IPv6 literal")
		}
	} else {
		var found bool
		hp.host, port, found = strings.Cut(s, ":")
		if found && port == "" {
			return hp, hostErr(s, "empty port")
		}
		switch {
		case hp.host == "":
			return hp, hostErr(s, "empty host")
		case strings.HasSuffix(hp.host, "."):
			return hp, hostErr(s, "trailing dot")
		case !validDNSName(hp.host):
			return hp, hostErr(s, "not a valid host name")
		}
		labels := strings.Split(hp.host, ".")
		if numericLabelRE.MatchString(labels[len(labels)-1]) {
			hp.ip = true
		}
	}
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 || len(port) > 5 || port[0] < '0' || port[0] > '9' {
			return hp, hostErr(s, "bad port %q", port)
		}
		hp.port = n
	}
	return hp, nil
}

// hostEntry is one parsed allowed_hosts entry.
type hostEntry struct {
	wildcard bool   // "*.suffix": one or more labels before suffix
	host     string // the exact host, or the suffix of a wildcard
	port     int    // 0: the scheme's default port only
}

// parseEntry parses an allowed_hosts entry: "api.xero.com",
// "*.my.salesforce.com", "127.0.0.1:8080", "[::1]:8080".
func parseEntry(e string) (hostEntry, error) {
	var he hostEntry
	rest, wild := strings.CutPrefix(e, "*.")
	hp, err := splitHost(rest)
	if err != nil {
		return he, fmt.Errorf("entry %q: %s", e, err.(*hostError).reason)
	}
	if wild {
		if hp.ip {
			return he, fmt.Errorf("entry %q: a wildcard cannot cover IP addresses", e)
		}
		if !strings.Contains(hp.host, ".") {
			return he, fmt.Errorf("entry %q: a wildcard suffix needs at least two labels", e)
		}
	}
	return hostEntry{wildcard: wild, host: hp.host, port: hp.port}, nil
}

// match reports whether the entry allows host h on the effective port.
func (e hostEntry) match(h hostPort, port, defaultPort int) bool {
	want := e.port
	if want == 0 {
		want = defaultPort
	}
	if port != want {
		return false
	}
	if e.wildcard {
		// h is a valid DNS name, so a match has a non-empty label before
		// the dot: never the bare suffix, never "evilmy.salesforce.com".
		return !h.ip && strings.HasSuffix(h.host, "."+e.host)
	}
	return h.host == e.host
}

// allow applies the host rules to u; errors are *hostError.
func (in *Integration) allow(u *url.URL) error {
	if u == nil {
		return hostErr("", "no URL")
	}
	scheme := strings.ToLower(u.Scheme)
	defaultPort := 443
	switch {
	case scheme == "https":
	case scheme == "http" && in.AllowHTTP:
		defaultPort = 80
	case scheme == "http":
		return hostErr(u.Host, "scheme http not allowed (allow_http is off)")
	default:
		return hostErr(u.Host, "scheme %q not allowed", u.Scheme)
	}
	if u.Opaque != "" {
		return hostErr("", "opaque URL")
	}
	if u.User != nil {
		return hostErr(u.Host, "userinfo not allowed")
	}
	hp, err := splitHost(u.Host)
	if err != nil {
		return err
	}
	port := hp.port
	if port == 0 {
		port = defaultPort
	}
	for _, raw := range in.AllowedHosts {
		e, err := parseEntry(raw)
		if err != nil {
			continue // refused by validation; a hand-built entry allows nothing
		}
		if e.match(hp, port, defaultPort) {
			return nil
		}
	}
	switch {
	case hp.ip:
		return hostErr(u.Host, "IP literal not listed in allowed_hosts")
	case hp.port != 0 && hp.port != defaultPort:
		return hostErr(u.Host, "port not listed in allowed_hosts")
	}
	return hostErr(u.Host, "not in allowed_hosts")
}

// CheckRedirect is usable as http.Client.CheckRedirect: it refuses a
// redirect whose target fails AllowURL, and more than 5 redirects.
func (in *Integration) CheckRedirect(req *http.Request, via []*http.Request) error {
	if len(via) > maxRedirects {
		return fmt.Errorf("catalog: integration %q: stopped after %d redirects", in.ID, maxRedirects)
	}
	if err := in.allow(req.URL); err != nil {
		return fmt.Errorf("catalog: integration %q: redirect: %w", in.ID, err)
	}
	return nil
}
