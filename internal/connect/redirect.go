package connect

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
)

// EnvRedirectURIs is the environment variable the redirect allow-list is
// read from.
const EnvRedirectURIs = "VAULTFLEET_REDIRECT_URIS"

// ErrRedirectNotAllowed means a session's redirect_uri is not on the
// allow-list.
var ErrRedirectNotAllowed = errors.New("connect: redirect_uri is not allowed by " + EnvRedirectURIs)

// Redirects is the allow-list of the URIs the connect flow and the Vault
// page may send a consumer back to. An entry with a path other than "/"
// must match exactly (query included); an entry that is an origin
// ("https://app.example.com" or with a trailing "/") allows every URI of
// that origin (same scheme, host and port). The zero value allows nothing.
type Redirects struct {
	exact   []string
	origins []string
}

// ParseRedirects reads a comma-separated allow-list. Entries must be
// absolute http(s) URLs without userinfo or fragment; http only for
// loopback hosts.
func ParseRedirects(spec string) (*Redirects, error) {
	r := &Redirects{}
	for i, e := range strings.Split(spec, ",") {
		e = strings.TrimSpace(e)
		if e == "" {
			continue
		}
		u, err := url.Parse(e)
		if err != nil || !u.IsAbs() || u.Host == "" || u.User != nil || u.Fragment != "" {
			return nil, fmt.Errorf("connect: %s entry %d: want an absolute URL without userinfo or fragment", EnvRedirectURIs, i+1)
		}
		switch {
		case u.Scheme == "https":
		case u.Scheme == "http" && loopback(u.Hostname()):
		default:
			return nil, fmt.Errorf("connect: %s entry %d: https only (http for loopback hosts)", EnvRedirectURIs, i+1)
		}
		if (u.Path == "" || u.Path == "/") && u.RawQuery == "" {
			r.origins = append(r.origins, origin(u))
		} else {
			r.exact = append(r.exact, u.String())
		}
	}
	return r, nil
}

func loopback(host string) bool {
	return host == "localhost" || host == "127.0.0.1" || host == "::1"
}

func origin(u *url.URL) string { return strings.ToLower(u.Scheme + "://" + u.Host) }

// Allowed reports whether uri may be redirected to.
func (r *Redirects) Allowed(uri string) bool {
	if r == nil || uri == "" {
		return false
	}
	u, err := url.Parse(uri)
	if err != nil || !u.IsAbs() || u.Host == "" || u.User != nil || u.Fragment != "" ||
		(u.Scheme != "https" && u.Scheme != "http") {
		return false
	}
	return slices.Contains(r.exact, u.String()) || slices.Contains(r.origins, origin(u))
}

// Empty reports whether nothing is allowed.
func (r *Redirects) Empty() bool { return r == nil || len(r.exact)+len(r.origins) == 0 }

// WithOutcome returns uri with status and reason added to its query (and
// the connection id when set). Nothing else: never a code or token.
func WithOutcome(uri, status, reason, connectionID string) string {
	u, err := url.Parse(uri)
	if err != nil {
		return uri
	}
	q := u.Query()
	q.Set("status", status)
	if reason != "" {
		q.Set("reason", reason)
	}
	if connectionID != "" {
		q.Set("connection", connectionID)
	}
	u.RawQuery = q.Encode()
	return u.String()
}
