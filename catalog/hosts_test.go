package catalog_test

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// hostsYAML allows an exact host, a wildcard, a host with a port, an IPv4
// literal and an IPv6 literal with a port.
const hostsYAML = `integrations:
  - id: hosty
    name: Hosty
    unified_api: crm
    auth_type: oauth2
    status: live
    check: {url: "https://api.xero.com/connections"}
    oauth: {token_url: "https://api.xero.com/token"}
    allowed_hosts:
      - api.xero.com
      - "*.my.salesforce.com"
      - port.example.com:8443
      - 10.1.2.3
      - "[::1]:9443"
`

func TestAllowURL(t *testing.T) {
	in := integration(t, mustParse(t, hostsYAML), "hosty")
	for _, tc := range []struct {
		raw string
		ok  bool
	}{
		{"https://api.xero.com/connections", true},
		{"https://API.XERO.COM/connections", true},
		{"https://api.xero.com:443/", true},
		{"HTTPS://api.xero.com/", true},
		{"https://acme.my.salesforce.com/services", true},
		{"https://a.b.my.salesforce.com/", true},
		{"https://port.example.com:8443/", true},
		{"https://10.1.2.3/", true},
		{"https://[::1]:9443/", true},

		// scheme
		{"http://api.xero.com/", false},
		{"ftp://api.xero.com/", false},
		{"//api.xero.com/", false},
		{"https:api.xero.com", false},
		// userinfo
		{"https://api.xero.com@evil.com/", false},
		{"https://user:pass@api.xero.com/", false},
		{"https://evil.com\\@api.xero.com/", false},
		{"https://api.xero.com%40evil.com/", false},
		// ports
		{"https://api.xero.com:8443/", false},
		{"https://api.xero.com:80/", false},
		{"https://api.xero.com:/", false},
		{"https://api.xero.com:0443/", true}, // the same port, as Go dials it
		{"https://api.xero.com:99999/", false},
		{"https://port.example.com/", false},
		{"https://port.example.com:443/", false},
		{"https://port.example.com:8444/", false},
		{"https://10.1.2.3:8443/", false},
		{"https://[::1]/", false},
		// IP literals and forms resolvers read as IPs
		{"https://127.0.0.1/", false},
		{"https://[::1]:443/", false},
		{"https://169.254.169.254/latest/meta-data/", false},
		{"https://2130706433/", false},
		{"https://0x7f000001/", false},
		{"https://0177.0.0.1/", false},
		{"https://127.1/", false},
		{"https://[::ffff:127.0.0.1]/", false},
		{"https://[::ffff:10.1.2.3]/", false},
		{"https://[fe80::1%25eth0]:9443/", false},
		{"https://10.1.2.3.nip.io/", false},
		{"https://localhost/", false},
		{"https://localhost:9443/", false},
		// suffix tricks
		{"https://api.xero.com.evil.com/", false},
		{"https://evilapi.xero.com/", false},
		{"https://xero.com/", false},
		{"https://evilmy.salesforce.com/", false},
		{"https://my.salesforce.com/", false},
		{"https://.my.salesforce.com/", false},
		{"https://acme.my.salesforce.com.evil.com/", false},
		// odd spellings
		{"https://api.xero.com./", false},
		{"https://api%2Exero.com/", false},
		{"https://api.xer%C3%B6.com/", false},
		{"https://api_xero.com/", false},
		{"https:///connections", false},
		{"https://api.xero.com\\connections", false},
	} {
		t.Run(tc.raw, func(t *testing.T) {
			u, err := url.Parse(tc.raw)
			if err == nil {
				err = in.AllowURL(u)
			} else {
				require.False(t, tc.ok, "parse: %v", err)
				return // net/url refuses it already: no request can be built
			}
			if tc.ok {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, catalog.ErrHostNotAllowed)
			require.ErrorContains(t, err, `integration "hosty"`)
		})
	}
	require.ErrorIs(t, in.AllowURL(nil), catalog.ErrHostNotAllowed)
}

func TestAllowHTTP(t *testing.T) {
	doc := strings.Replace(hostsYAML, "    allowed_hosts:", "    allow_http: true\n    allowed_hosts:", 1)
	in := integration(t, mustParse(t, doc), "hosty")
	require.NoError(t, in.AllowURL(mustURL(t, "http://api.xero.com/")))
	require.NoError(t, in.AllowURL(mustURL(t, "http://api.xero.com:80/")))
	require.ErrorIs(t, in.AllowURL(mustURL(t, "http://api.xero.com:443/")), catalog.ErrHostNotAllowed)
	require.NoError(t, in.AllowURL(mustURL(t, "http://port.example.com:8443/")))
	require.ErrorIs(t, in.AllowURL(mustURL(t, "gopher://api.xero.com/")), catalog.ErrHostNotAllowed)
}

func TestSettings(t *testing.T) {
	c := defaultCatalog(t)
	long := strings.Repeat("a", 257)
	for _, tc := range []struct {
		id, name, value string
		want            error  // nil, ErrHostNotAllowed or ErrInvalidSetting
		url             string // the check URL built, when want is nil
	}{
		// url setting (Salesforce instance_url)
		{"salesforce", "instance_url", "https://acme.my.salesforce.com", nil, "https://acme.my.salesforce.com/services/oauth2/userinfo"},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com/", nil, "https://acme.my.salesforce.com/services/oauth2/userinfo"},
		{"salesforce", "instance_url", "https://ACME.my.salesforce.com", nil, "https://acme.my.salesforce.com/services/oauth2/userinfo"},
		{"salesforce", "instance_url", "https://na1.salesforce.com", nil, "https://na1.salesforce.com/services/oauth2/userinfo"},
		{"salesforce", "instance_url", "https://127.0.0.1/", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://[::1]/", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://x.my.salesforce.com@169.254.169.254/", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://169.254.169.254/latest/meta-data", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://2130706433", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "http://acme.my.salesforce.com", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com:8443", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com.evil.com", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://evil.com\\@acme.my.salesforce.com", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://evil.com%2F@acme.my.salesforce.com", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com./", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://salesforce.com", catalog.ErrHostNotAllowed, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com/services/evil", catalog.ErrInvalidSetting, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com?x=1", catalog.ErrInvalidSetting, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com#x", catalog.ErrInvalidSetting, ""},
		{"salesforce", "instance_url", "acme.my.salesforce.com", catalog.ErrInvalidSetting, ""},
		{"salesforce", "instance_url", "https://acme.my.salesforce.com\n", catalog.ErrInvalidSetting, ""},
		// text setting in a host (Zendesk subdomain)
		{"zendesk", "subdomain", "acme", nil, "https://acme.zendesk.com/api/v2/users/me.json"},
		{"zendesk", "subdomain", "ACME-2", nil, "https://acme-2.zendesk.com/api/v2/users/me.json"},
		{"zendesk", "subdomain", "evil.com#", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "evil.com/", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "evil.com?", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "a.b", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "x@evil.com", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "-acme", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "a_b", catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", strings.Repeat("a", 64), catalog.ErrHostNotAllowed, ""},
		{"zendesk", "subdomain", "a/b", catalog.ErrHostNotAllowed, ""},
		// text setting in a path (BambooHR subdomain, Workday tenant)
		{"bamboohr", "subdomain", "acme", nil, "https://api.bamboohr.com/api/gateway.php/acme/v1/meta/fields"},
		{"bamboohr", "subdomain", "a b?c#d", nil, "https://api.bamboohr.com/api/gateway.php/a%20b%3Fc%23d/v1/meta/fields"},
		{"bamboohr", "subdomain", "../", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "..", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", ".", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "%2F", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "..%2F..%2Fadmin", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "a/b", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "a\\b", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "a\x00b", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "a\r\nb", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", "\xff", catalog.ErrInvalidSetting, ""},
		{"bamboohr", "subdomain", long, catalog.ErrInvalidSetting, ""},
		{"workday", "tenant_id", "../../admin", catalog.ErrInvalidSetting, ""},
		// host setting (Workday host)
		{"workday", "host", "wd2-impl-services1.workday.com", nil, "https://wd2-impl-services1.workday.com/ccx/api/v4/acme_corp1/workers?limit=1"},
		{"workday", "host", "Services1.MyWorkday.com", nil, "https://services1.myworkday.com/ccx/api/v4/acme_corp1/workers?limit=1"},
		{"workday", "host", "workday.com", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "evil.com", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "127.0.0.1", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "169.254.169.254", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "wd2.workday.com:8443", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "wd2.workday.com/evil", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "x.workday.com@evil.com", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "evil.com#.workday.com", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "wd2.workday.com.", catalog.ErrHostNotAllowed, ""},
		{"workday", "host", "https://wd2.workday.com", catalog.ErrHostNotAllowed, ""},
		// unknown names
		{"salesforce", "instanceurl", "https://acme.my.salesforce.com", catalog.ErrInvalidSetting, ""},
		{"hubspot", "portal", "", catalog.ErrInvalidSetting, ""},
	} {
		t.Run(fmt.Sprintf("%s/%s=%q", tc.id, tc.name, tc.value), func(t *testing.T) {
			in := integration(t, c, tc.id)
			settings := map[string]string{}
			for k, v := range plausible[tc.id] {
				settings[k] = v
			}
			settings[tc.name] = tc.value
			err := in.ValidateSettings(map[string]string{tc.name: tc.value})
			u, buildErr := in.CheckURL(settings)
			if tc.want == nil {
				require.NoError(t, err)
				require.NoError(t, buildErr)
				require.Equal(t, tc.url, u.String())
				return
			}
			require.ErrorIs(t, err, catalog.ErrInvalidSetting)
			require.ErrorIs(t, err, tc.want)
			require.ErrorContains(t, err, fmt.Sprintf("%q", tc.name))
			if tc.want != catalog.ErrHostNotAllowed {
				require.NotErrorIs(t, err, catalog.ErrHostNotAllowed)
			}
			if in.SettingAffectsCheck(tc.name) { // known and used: the builder refuses it too
				require.Error(t, buildErr)
				require.ErrorIs(t, buildErr, tc.want)
			}
		})
	}
}

func TestEmptySettings(t *testing.T) {
	c := defaultCatalog(t)
	for _, in := range c.Integrations {
		empty := map[string]string{}
		for _, s := range in.Settings {
			empty[s.Name] = ""
		}
		require.NoError(t, in.ValidateSettings(empty), in.ID)
		require.NoError(t, in.ValidateSettings(nil), in.ID)
	}
	_, err := integration(t, c, "zendesk").CheckURL(nil)
	require.ErrorIs(t, err, catalog.ErrMissingSetting)
	require.ErrorContains(t, err, `"subdomain"`)
	_, err = integration(t, c, "workday").TokenURL(map[string]string{"host": "wd2.workday.com"})
	require.ErrorIs(t, err, catalog.ErrMissingSetting)
	require.ErrorContains(t, err, `"tenant_id"`)
}

// redirectCatalog allows exactly the given host:port over http.
func redirectCatalog(t *testing.T, hostport string) *catalog.Integration {
	t.Helper()
	c := mustParse(t, fmt.Sprintf(`integrations:
  - id: sim
    name: Simulated
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    allow_http: true
    check: {url: "http://%s/check"}
    allowed_hosts: ["%s"]
`, hostport, hostport))
	return integration(t, c, "sim")
}

func TestCheckRedirect(t *testing.T) {
	var secondHits, loopHits atomic.Int64
	second := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		secondHits.Add(1)
	}))
	t.Cleanup(second.Close)

	mux := http.NewServeMux()
	mux.HandleFunc("/check", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, second.URL+"/stolen", http.StatusFound)
	})
	mux.HandleFunc("/local", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/ok", http.StatusFound)
	})
	mux.HandleFunc("/ok", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})
	mux.HandleFunc("/loop", func(w http.ResponseWriter, r *http.Request) {
		loopHits.Add(1)
		http.Redirect(w, r, "/loop", http.StatusFound)
	})
	mux.HandleFunc("/metadata", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://169.254.169.254/latest/meta-data/", http.StatusFound)
	})
	first := httptest.NewServer(mux)
	t.Cleanup(first.Close)

	firstHost := strings.TrimPrefix(first.URL, "http://")
	in := redirectCatalog(t, firstHost)
	client := &http.Client{CheckRedirect: in.CheckRedirect}
	t.Cleanup(client.CloseIdleConnections)

	get := func(path string) (*http.Response, error) {
		resp, err := client.Get(first.URL + path)
		if resp != nil {
			_ = resp.Body.Close()
		}
		return resp, err
	}

	checkURL, err := in.CheckURL(nil)
	require.NoError(t, err)
	require.Equal(t, first.URL+"/check", checkURL.String())

	_, err = get("/check")
	require.ErrorIs(t, err, catalog.ErrHostNotAllowed)
	require.ErrorContains(t, err, strings.TrimPrefix(second.URL, "http://"))
	require.Zero(t, secondHits.Load(), "the second server must receive no request")

	_, err = get("/metadata")
	require.ErrorIs(t, err, catalog.ErrHostNotAllowed)

	resp, err := get("/local")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "/ok", resp.Request.URL.Path)

	_, err = get("/loop")
	require.ErrorContains(t, err, "stopped after 5 redirects")
	require.Equal(t, int64(6), loopHits.Load())

	// The second server itself is reachable: only the host rules stopped it.
	_, port, err := net.SplitHostPort(strings.TrimPrefix(second.URL, "http://"))
	require.NoError(t, err)
	require.NotEqual(t, firstHost, "127.0.0.1:"+port)
}

// fuzzIntegration allows api.xero.com, *.my.salesforce.com and 127.0.0.1:8443.
func fuzzIntegration(t testing.TB) *catalog.Integration {
	c, err := catalog.Parse([]byte(`integrations:
  - id: fuzz
    name: Fuzz
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings: [{name: instance_url, type: url}]
    check: {url: "{instance_url}/me"}
    allowed_hosts: [api.xero.com, "*.my.salesforce.com", "127.0.0.1:8443"]
`))
	require.NoError(t, err)
	in, _ := c.Get("fuzz")
	return in
}

// allowedByOracle restates the allowed hosts of fuzzIntegration plainly.
func allowedByOracle(u *url.URL) bool {
	if u.Scheme != "https" || u.User != nil {
		return false
	}
	h, p := strings.ToLower(u.Hostname()), u.Port()
	defaultPort := p == "" || strings.TrimLeft(p, "0") == "443"
	switch {
	case h == "api.xero.com":
		return defaultPort
	case strings.HasSuffix(h, ".my.salesforce.com") && len(h) > len(".my.salesforce.com"):
		return defaultPort && net.ParseIP(h) == nil
	case h == "127.0.0.1":
		return strings.TrimLeft(p, "0") == "8443"
	}
	return false
}

func FuzzAllowURL(f *testing.F) {
	for _, s := range []string{
		"https://api.xero.com/connections", "https://acme.my.salesforce.com", "https://127.0.0.1:8443/",
		"https://127.0.0.1/", "https://api.xero.com@evil.com/", "https://my.salesforce.com/",
		"https://evilmy.salesforce.com", "https://0x7f000001/", "https://[::1]:8443/", "http://api.xero.com",
		"https://API.xero.com:443", "https://a.my.salesforce.com.", "https://x.my.salesforce.com@169.254.169.254/",
	} {
		f.Add(s)
	}
	in := fuzzIntegration(f)
	f.Fuzz(func(t *testing.T, raw string) {
		if u, err := url.Parse(raw); err == nil {
			if in.AllowURL(u) == nil && !allowedByOracle(u) {
				t.Fatalf("AllowURL accepted %q (host %q)", raw, u.Host)
			}
		}
		// The same string as a url setting: whatever builds is allowed.
		if raw == "" || in.ValidateSettings(map[string]string{"instance_url": raw}) != nil {
			return
		}
		u, err := in.CheckURL(map[string]string{"instance_url": raw})
		if err != nil {
			t.Fatalf("validated %q but CheckURL failed: %v", raw, err)
		}
		if !allowedByOracle(u) || u.Path != "/me" || u.RawQuery != "" {
			t.Fatalf("built %q from %q", u, raw)
		}
	})
}

func FuzzTextSetting(f *testing.F) {
	for _, s := range []string{"acme", "../", "%2F", "a/b", "evil.com#", "A-b", "..", "a b", "\x00"} {
		f.Add(s)
	}
	c := defaultCatalog(f)
	zendesk, bamboo := integration(f, c, "zendesk"), integration(f, c, "bamboohr")
	f.Fuzz(func(t *testing.T, v string) {
		if u, err := zendesk.CheckURL(map[string]string{"subdomain": v}); err == nil {
			label, ok := strings.CutSuffix(u.Host, ".zendesk.com")
			if !ok || label == "" || strings.ContainsAny(label, ".:@") || u.Path != "/api/v2/users/me.json" {
				t.Fatalf("zendesk subdomain %q built %q", v, u)
			}
		}
		if u, err := bamboo.CheckURL(map[string]string{"subdomain": v}); err == nil {
			rest, ok := strings.CutPrefix(u.EscapedPath(), "/api/gateway.php/")
			seg, tail, _ := strings.Cut(rest, "/")
			if !ok || u.Host != "api.bamboohr.com" || tail != "v1/meta/fields" || u.RawQuery != "" || seg == "" {
				t.Fatalf("bamboohr subdomain %q built %q", v, u)
			}
			if got, _ := url.PathUnescape(seg); got != v {
				t.Fatalf("bamboohr subdomain %q came out as %q", v, got)
			}
		}
	})
}

func TestProviderHost(t *testing.T) {
	t.Parallel()
	cat, err := catalog.Parse([]byte(`
integrations:
  - id: salesforce
    name: Salesforce
    unified_api: crm
    auth_type: oauth2
    status: live
    settings:
      - {name: instance_url, type: url, required: true}
    check:
      url: "{instance_url}/services/oauth2/userinfo"
    oauth:
      token_url: https://login.salesforce.com/services/oauth2/token
      client_id_env: SF_ID
      client_secret_env: SF_SECRET
    allowed_hosts: ["*.my.salesforce.com", login.salesforce.com]
  - id: zendesk
    name: Zendesk
    unified_api: ticketing
    auth_type: basic
    status: live
    credential_fields: [username, password]
    settings:
      - {name: subdomain, required: true}
    check:
      url: https://{subdomain}.zendesk.com/api/v2/users/me.json
    allowed_hosts: ["*.zendesk.com"]
  - id: bamboohr
    name: BambooHR
    unified_api: hris
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings:
      - {name: subdomain, required: true}
    base_url: https://api.bamboohr.com
    check:
      url: "{base_url}/api/gateway.php/{subdomain}/v1/meta/fields"
    allowed_hosts: [api.bamboohr.com]
  - id: local
    name: Local
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://127.0.0.1:8080/me
    allow_http: true
    allowed_hosts: ["127.0.0.1:8080"]
`))
	require.NoError(t, err)
	get := func(id string) *catalog.Integration {
		in, ok := cat.Get(id)
		require.True(t, ok)
		return in
	}
	u := func(s string) *url.URL {
		p, err := url.Parse(s)
		require.NoError(t, err)
		return p
	}
	tests := []struct {
		id, url string
		want    bool
	}{
		{"salesforce", "https://login.salesforce.com/services/oauth2/token", true},
		{"salesforce", "https://LOGIN.salesforce.com:443/x", true},
		{"salesforce", "https://acme.my.salesforce.com/services/oauth2/userinfo", false},
		{"zendesk", "https://acme.zendesk.com/api/v2/users/me.json", false},
		{"zendesk", "https://zendesk.com/", false},
		{"bamboohr", "https://api.bamboohr.com/api/gateway.php/acme/v1/meta/fields", true},
		{"bamboohr", "http://api.bamboohr.com/", false},
		{"local", "http://127.0.0.1:8080/me", true},
		{"local", "http://127.0.0.1:8081/me", false},
	}
	for _, tc := range tests {
		require.Equal(t, tc.want, get(tc.id).ProviderHost(u(tc.url)), "%s %s", tc.id, tc.url)
	}
	require.False(t, get("local").ProviderHost(nil))
}
