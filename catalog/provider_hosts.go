package catalog

import (
	"net"
	"net/url"
	"strings"
)

// ProviderHost reports whether u points at one of the provider's own
// hosts, fixed in the catalog rather than chosen by a consumer: the host
// of base_url, or of a URL template (check.url, oauth.token_url) whose
// host part holds no consumer setting (a literal host, or {base_url}).
// A host that a consumer's setting chose ({instance_url},
// https://{host}/..., https://{subdomain}.zendesk.com/...) is not, even
// though an allowed_hosts wildcard allows it: a failure to reach it may be
// that consumer's own misconfiguration. Scheme default ports are
// normalised; host names compare case-insensitively.
func (in *Integration) ProviderHost(u *url.URL) bool {
	if u == nil || u.Host == "" {
		return false
	}
	want := originKey(u.Scheme, u.Host)
	for _, raw := range in.providerOrigins() {
		if scheme, host, ok := strings.Cut(raw, "://"); ok && originKey(scheme, authority(raw)) == want && host != "" {
			return true
		}
	}
	return false
}

// providerOrigins lists the raw scheme://host[:port] origins fixed in the
// catalog (see ProviderHost).
func (in *Integration) providerOrigins() []string {
	var out []string
	if in.BaseURL != "" {
		out = append(out, in.BaseURL)
	}
	for _, t := range in.urlTemplates() {
		segs, err := in.compileURL(t[1])
		if err != nil || len(segs) == 0 {
			continue
		}
		if segs[0].name != "" {
			// {base_url} is listed above; a url setting is the consumer's.
			continue
		}
		fixed := true
		for _, s := range segs {
			if s.name != "" && s.where == inHost {
				fixed = false
			}
		}
		if fixed {
			out = append(out, t[1])
		}
	}
	return out
}

// originKey is "scheme://host:port" in lower case with the scheme's
// default port made explicit.
func originKey(scheme, hostport string) string {
	scheme = strings.ToLower(scheme)
	hostport = strings.ToLower(hostport)
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host, port = strings.Trim(hostport, "[]"), ""
	}
	if port == "" {
		port = "443"
		if scheme == "http" {
			port = "80"
		}
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}
