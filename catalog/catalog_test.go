package catalog_test

import (
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// plausible holds settings that every default integration accepts.
var plausible = map[string]map[string]string{
	"salesforce": {"instance_url": "https://acme.my.salesforce.com"},
	"bamboohr":   {"subdomain": "acme"},
	"workday":    {"host": "wd2-impl-services1.workday.com", "tenant_id": "acme_corp1"},
	"xero":       {"tenant_id": "70784a63-d24b-46a9-a4db-0e70a274b056"},
	"zendesk":    {"subdomain": "acme"},
	"freshdesk":  {"subdomain": "acme"},
}

func defaultCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Default()
	require.NoError(t, err)
	return c
}

func integration(t testing.TB, c *catalog.Catalog, id string) *catalog.Integration {
	t.Helper()
	in, ok := c.Get(id)
	require.True(t, ok, id)
	return in
}

func TestDefaultCatalog(t *testing.T) {
	c := defaultCatalog(t)
	ids := c.IDs()
	for _, id := range []string{"salesforce", "hubspot", "bamboohr", "workday", "xero", "pipedrive", "zendesk"} {
		require.Contains(t, ids, id)
		require.True(t, integration(t, c, id).Checkable(), id)
	}
	var notChecked int
	for _, in := range c.Integrations {
		if !in.Checkable() {
			notChecked++
		}
		settings := plausible[in.ID]
		require.NoError(t, in.ValidateSettings(settings), in.ID)

		u, err := in.CheckURL(settings)
		require.NoError(t, err, in.ID)
		require.Equal(t, "https", u.Scheme, in.ID)
		require.NoError(t, in.AllowURL(u), in.ID)

		_, err = in.CheckHeaders(settings)
		require.NoError(t, err, in.ID)

		if in.AuthType == catalog.AuthOAuth2 {
			u, err := in.TokenURL(settings)
			require.NoError(t, err, in.ID)
			require.NoError(t, in.AllowURL(u), in.ID)
			require.NotEmpty(t, in.OAuth.ClientIDEnv, in.ID)
		} else {
			_, err := in.TokenURL(settings)
			require.Error(t, err, in.ID)
		}
		for _, s := range in.Settings {
			if s.Required && in.SettingAffectsCheck(s.Name) {
				missing := map[string]string{}
				for k, v := range settings {
					if k != s.Name {
						missing[k] = v
					}
				}
				if _, err := in.CheckURL(missing); err != nil {
					require.ErrorIs(t, err, catalog.ErrMissingSetting, in.ID)
					require.ErrorContains(t, err, s.Name)
				}
			}
		}
	}
	require.Positive(t, notChecked, "a connector that is not live or beta")

	urls := map[string]string{}
	for _, in := range c.Integrations {
		u, err := in.CheckURL(plausible[in.ID])
		require.NoError(t, err)
		urls[in.ID] = u.String()
	}
	require.Equal(t, "https://acme.my.salesforce.com/services/oauth2/userinfo", urls["salesforce"])
	require.Equal(t, "https://api.hubapi.com/account-info/v3/details", urls["hubspot"])
	require.Equal(t, "https://api.bamboohr.com/api/gateway.php/acme/v1/meta/fields", urls["bamboohr"])
	require.Equal(t, "https://wd2-impl-services1.workday.com/ccx/api/v4/acme_corp1/workers?limit=1", urls["workday"])
	require.Equal(t, "https://api.xero.com/connections", urls["xero"])
	require.Equal(t, "https://api.pipedrive.com/v1/users/me", urls["pipedrive"])
	require.Equal(t, "https://acme.zendesk.com/api/v2/users/me.json", urls["zendesk"])

	wd, err := integration(t, c, "workday").TokenURL(plausible["workday"])
	require.NoError(t, err)
	require.Equal(t, "https://wd2-impl-services1.workday.com/ccx/oauth2/acme_corp1/token", wd.String())
}

func TestDefaultCatalogDetails(t *testing.T) {
	c := defaultCatalog(t)

	sf := integration(t, c, "salesforce")
	require.Equal(t, catalog.SettingURL, sf.Settings[0].Type)
	require.Equal(t, 2*time.Hour, sf.TokenLifetime.D())
	require.Equal(t, "SALESFORCE_CLIENT_SECRET", sf.OAuth.ClientSecretEnv)
	require.Equal(t, catalog.CheckAuth{Scheme: "bearer", Field: "access_token"}, sf.Check.Auth)

	bh := integration(t, c, "bamboohr")
	require.Equal(t, catalog.CheckAuth{Scheme: "basic", Username: "api_key", Password: "literal:x"}, bh.Check.Auth)
	h, err := bh.CheckHeaders(plausible["bamboohr"])
	require.NoError(t, err)
	require.Equal(t, "application/json", h.Get("Accept"))
	require.True(t, bh.IsInvalidStatus(404))

	pd := integration(t, c, "pipedrive")
	require.Equal(t, catalog.CheckAuth{Scheme: "header", Name: "x-api-token", Field: "api_key"}, pd.Check.Auth)

	zd := integration(t, c, "zendesk")
	require.Equal(t, &catalog.Assertion{Path: "user.id", NotNull: true}, zd.Check.Assert)
	require.Equal(t, catalog.CheckAuth{Scheme: "basic", Username: "username", Password: "password"}, zd.Check.Auth)

	xr := integration(t, c, "xero")
	require.Equal(t, 5*time.Minute, xr.RefreshWindowFor(30*time.Minute))
	require.Equal(t, catalog.RateLimit{Requests: 60, Per: catalog.Duration(time.Minute)}, xr.RateLimit)
	require.Equal(t, 1, xr.ConfirmInvalid)
	require.Equal(t, "accounting", xr.UnifiedAPI)

	hs := integration(t, c, "hubspot")
	require.Equal(t, "params", hs.OAuth.AuthStyle)
	require.Equal(t, "GET", hs.Check.Method)
	require.Equal(t, 10*time.Second, hs.Check.Timeout.D())
	require.Equal(t, time.Minute, hs.ConfirmSpacing.D())
	require.Equal(t, []int{401, 403}, hs.Check.InvalidStatuses)
}

func TestDefaultReturnsIndependentCopies(t *testing.T) {
	a, b := defaultCatalog(t), defaultCatalog(t)
	in := integration(t, a, "xero")
	in.AllowedHosts = append(in.AllowedHosts, "evil.com")
	in.Intervals["callable"] = catalog.Duration(time.Second)
	a.Integrations = a.Integrations[:1]

	other := integration(t, b, "xero")
	require.NotContains(t, other.AllowedHosts, "evil.com")
	require.Equal(t, time.Hour, other.Interval("callable"))
	require.Contains(t, b.IDs(), "zendesk")
}

func TestLookup(t *testing.T) {
	c := defaultCatalog(t)
	in, err := c.Lookup("crm", "salesforce")
	require.NoError(t, err)
	require.Equal(t, "salesforce", in.ID)

	for _, tc := range []struct{ api, id string }{
		{"hris", "salesforce"}, {"crm", "nope"}, {"", ""}, {"crm", "Salesforce"},
	} {
		_, err := c.Lookup(tc.api, tc.id)
		require.ErrorIs(t, err, catalog.ErrUnknownIntegration)
		require.ErrorContains(t, err, tc.api+"+"+tc.id)
	}

	var crm []string
	for _, in := range c.ByUnifiedAPI("crm") {
		crm = append(crm, in.ID)
	}
	require.Equal(t, []string{"salesforce", "hubspot", "pipedrive"}, crm)
	require.Empty(t, c.ByUnifiedAPI("nope"))
	require.Equal(t, []string{"accounting", "crm", "hris", "ticketing"}, c.UnifiedAPIs())

	_, ok := c.Get("nope")
	require.False(t, ok)
	// A hand-built catalog works too.
	hand := &catalog.Catalog{Integrations: []*catalog.Integration{{ID: "x", UnifiedAPI: "crm"}}}
	_, err = hand.Lookup("crm", "x")
	require.NoError(t, err)
}

func TestIntervalsAndWindows(t *testing.T) {
	c := mustParse(t, `integrations:
  - id: acme
    name: Acme
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check: {url: "https://api.acme.com/me"}
    allowed_hosts: [api.acme.com]
    intervals: {callable: 30m, invalid: 2h}
`)
	in := integration(t, c, "acme")
	for _, tc := range []struct {
		state string
		want  time.Duration
	}{
		{"callable", 30 * time.Minute},
		{"invalid", 2 * time.Hour},
		{"added", time.Hour},
		{"authorized", time.Hour},
		{"", time.Hour},
	} {
		require.Equal(t, tc.want, in.Interval(tc.state), tc.state)
	}
	// A hand-built integration gets the defaults too.
	bare := &catalog.Integration{}
	require.Equal(t, time.Hour, bare.Interval("callable"))
	require.Equal(t, 6*time.Hour, bare.Interval("invalid"))
	require.True(t, bare.IsInvalidStatus(401))
	require.False(t, bare.IsInvalidStatus(404))

	for _, tc := range []struct {
		lifetime, want time.Duration
	}{
		{2 * time.Hour, 10 * time.Minute},
		{30 * time.Minute, 6 * time.Minute},
		{time.Minute, 12 * time.Second},
		{0, 10 * time.Minute},
		{-time.Hour, 10 * time.Minute},
	} {
		require.Equal(t, tc.want, in.RefreshWindowFor(tc.lifetime), tc.lifetime)
	}
}

func TestSettingAffectsCheckAndHeaders(t *testing.T) {
	c := mustParse(t, `integrations:
  - id: acme
    name: Acme
    unified_api: crm
    auth_type: oauth2
    status: beta
    settings:
      - {name: region, type: text}
      - {name: tenant, type: text}
      - {name: org, type: text}
      - {name: color}
      - {name: mood, affects_check: true}
    check:
      url: "https://{region}.acme.com/v1/me"
      headers: {X-Tenant: "{tenant}", X-Static: yes}
    oauth: {token_url: "https://login.acme.com/{org}/token"}
    allowed_hosts: ["*.acme.com"]
`)
	in := integration(t, c, "acme")
	for name, want := range map[string]bool{
		"region": true, "tenant": true, "org": true, "mood": true, "color": false, "nope": false,
	} {
		require.Equal(t, want, in.SettingAffectsCheck(name), name)
	}
	h, err := in.CheckHeaders(map[string]string{"tenant": "t-1"})
	require.NoError(t, err)
	require.Equal(t, "t-1", h.Get("X-Tenant"))
	require.Equal(t, "yes", h.Get("X-Static"))

	_, err = in.CheckHeaders(nil)
	require.ErrorIs(t, err, catalog.ErrMissingSetting)
	require.ErrorContains(t, err, `"tenant"`)

	_, err = in.CheckHeaders(map[string]string{"tenant": "a\r\nX-Evil: 1"})
	require.ErrorIs(t, err, catalog.ErrInvalidSetting)
	require.Error(t, in.ValidateSettings(map[string]string{"tenant": "a\nb"}))

	u, err := in.TokenURL(map[string]string{"org": "acme"})
	require.NoError(t, err)
	require.Equal(t, "https://login.acme.com/acme/token", u.String())
}

func TestBaseURL(t *testing.T) {
	c := mustParse(t, `integrations:
  - id: acme
    name: Acme
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    base_url: https://api.acme.com/v2/
    settings: [{name: account}]
    check: {url: "{base_url}/accounts/{account}?expand=owner"}
    allowed_hosts: [api.acme.com]
`)
	in := integration(t, c, "acme")
	u, err := in.CheckURL(map[string]string{"account": "a b?c"})
	require.NoError(t, err)
	require.Equal(t, "https://api.acme.com/v2/accounts/a%20b%3Fc?expand=owner", u.String())
	require.Equal(t, "/v2/accounts/a b?c", u.Path)
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "catalog.yaml")
	require.NoError(t, os.WriteFile(good, []byte(baseYAML), 0o600))
	c, err := catalog.Load(good)
	require.NoError(t, err)
	require.Equal(t, []string{"xero"}, c.IDs())

	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("integrations: [{id: Bad}]"), 0o600))
	_, err = catalog.Load(bad)
	require.ErrorContains(t, err, bad)
	require.ErrorContains(t, err, `integration "Bad": id`)

	_, err = catalog.Load(filepath.Join(dir, "missing.yaml"))
	require.Error(t, err)
}

func TestDurationYAML(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"90s": 90 * time.Second, "1h": time.Hour, "10m": 10 * time.Minute, "1h30m": 90 * time.Minute, "0": 0,
	} {
		var d catalog.Duration
		require.NoError(t, yaml.Unmarshal([]byte(in), &d), in)
		require.Equal(t, want, d.D(), in)
	}
	for _, in := range []string{"10", "soon", "[1h]", "{a: 1}"} {
		var d catalog.Duration
		require.Error(t, yaml.Unmarshal([]byte(in), &d), in)
	}
	out, err := yaml.Marshal(struct {
		D catalog.Duration `yaml:"d"`
	}{catalog.Duration(90 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "d: 1m30s\n", string(out))
	var back struct {
		D catalog.Duration `yaml:"d"`
	}
	require.NoError(t, yaml.Unmarshal(out, &back))
	require.Equal(t, 90*time.Second, back.D.D())
}

func mustParse(t testing.TB, doc string) *catalog.Catalog {
	t.Helper()
	c, err := catalog.Parse([]byte(doc))
	require.NoError(t, err)
	return c
}

func mustURL(t testing.TB, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	return u
}

func TestDurationsOrDefault(t *testing.T) {
	t.Parallel()
	bare := &catalog.Integration{ID: "bare"}
	require.Equal(t, catalog.DefaultTokenLifetime, bare.TokenLifetimeOrDefault())
	require.Equal(t, catalog.DefaultConfirmSpacing, bare.ConfirmSpacingOrDefault())
	set := &catalog.Integration{ID: "set", TokenLifetime: catalog.Duration(30 * time.Minute), ConfirmSpacing: catalog.Duration(5 * time.Second)}
	require.Equal(t, 30*time.Minute, set.TokenLifetimeOrDefault())
	require.Equal(t, 5*time.Second, set.ConfirmSpacingOrDefault())
}

// TestDefaultCatalogGuardsEveryCheckedIntegration: every integration the
// fleet checks (live or beta) sets the invalid-wave guard.
func TestDefaultCatalogGuardsEveryCheckedIntegration(t *testing.T) {
	t.Parallel()
	cat, err := catalog.Default()
	require.NoError(t, err)
	n := 0
	for _, in := range cat.Integrations {
		if !in.Checkable() {
			continue
		}
		n++
		require.NotNil(t, in.InvalidWave, in.ID)
		require.Equal(t, 20, in.InvalidWave.Threshold, in.ID)
		require.Equal(t, 10*time.Minute, in.InvalidWave.Window.D(), in.ID)
	}
	require.GreaterOrEqual(t, n, 6)
}
