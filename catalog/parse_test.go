package catalog_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// baseYAML is a valid catalog that the cases below break one way each.
const baseYAML = `integrations:
  - id: xero
    name: Xero
    unified_api: accounting
    auth_type: oauth2
    status: live
    settings:
      - name: tenant_id
        required: true
    check:
      url: https://api.xero.com/connections
    oauth:
      token_url: https://identity.xero.com/connect/token
      client_id_env: XERO_CLIENT_ID
    allowed_hosts: [api.xero.com, identity.xero.com]
`

const (
	checkURL = "      url: https://api.xero.com/connections\n"
	oauthBlk = "    oauth:\n      token_url: https://identity.xero.com/connect/token\n      client_id_env: XERO_CLIENT_ID\n"
	hosts    = "    allowed_hosts: [api.xero.com, identity.xero.com]\n"
)

func TestParseBase(t *testing.T) {
	c := mustParse(t, baseYAML)
	in := integration(t, c, "xero")
	require.Equal(t, catalog.SettingText, in.Settings[0].Type)
	require.Equal(t, "header", in.OAuth.AuthStyle)
	require.Equal(t, catalog.GrantAuthorizationCode, in.GrantType())
	cc := mustParse(t, strings.Replace(baseYAML, "      client_id_env: XERO_CLIENT_ID\n",
		"      client_id_env: XERO_CLIENT_ID\n      grant_type: client_credentials\n", 1))
	require.Equal(t, catalog.GrantClientCredentials, integration(t, cc, "xero").GrantType())
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		repl []string // old, new, old, new, ...
		want []string // substrings of the error
	}{
		{"unknown grant type", []string{"      client_id_env: XERO_CLIENT_ID\n", "      client_id_env: XERO_CLIENT_ID\n      grant_type: implicit\n"},
			[]string{`integration "xero": oauth.grant_type: "implicit" is not one of`}},
		{"unknown key", []string{"    name: Xero\n", "    name: Xero\n    nmae: Xero\n"},
			[]string{`integration "xero"`, "nmae"}},
		{"unknown nested key", []string{checkURL, checkURL + "      methd: GET\n"},
			[]string{`integration "xero"`, "check.methd"}},
		{"wrong type", []string{hosts, hosts + "    confirm_invalid: many\n"},
			[]string{`integration "xero"`, "confirm_invalid"}},
		{"undeclared placeholder", []string{checkURL, "      url: https://api.xero.com/{tenant}/connections\n"},
			[]string{`integration "xero": check.url: placeholder {tenant} is not a declared setting`}},
		{"upper-case id", []string{"id: xero", "id: Xero"},
			[]string{`integration "Xero"`, "id"}},
		{"missing id", []string{"  - id: xero\n    name", "  - name"},
			[]string{`integration #1`, "id: required"}},
		{"duplicate id", []string{hosts, hosts + strings.TrimPrefix(baseYAML, "integrations:\n")},
			[]string{`integration "xero"`, "id: duplicate"}},
		{"missing name", []string{"    name: Xero\n", ""},
			[]string{`integration "xero"`, "name: required"}},
		{"unified api", []string{"unified_api: accounting", "unified_api: Accounting"},
			[]string{`integration "xero"`, "unified_api"}},
		{"auth type", []string{"auth_type: oauth2", "auth_type: oauth"},
			[]string{`integration "xero"`, "auth_type"}},
		{"status", []string{"status: live", "status: ga"},
			[]string{`integration "xero"`, "status"}},
		{"api_key without credential fields", []string{"auth_type: oauth2", "auth_type: api_key", oauthBlk, ""},
			[]string{`integration "xero"`, "credential_fields: required"}},
		{"credential field not snake", []string{"status: live\n", "status: live\n    credential_fields: [ApiKey]\n"},
			[]string{`integration "xero"`, "credential_fields[0]"}},
		{"setting name", []string{"name: tenant_id", "name: TenantID"},
			[]string{`integration "xero"`, "settings[0].name"}},
		{"setting base_url", []string{"name: tenant_id", "name: base_url"},
			[]string{`integration "xero"`, "settings[0].name", "reserved"}},
		{"setting type", []string{"        required: true\n", "        required: true\n        type: uri\n"},
			[]string{`integration "xero"`, "settings[0].type"}},
		{"old url flag", []string{"        required: true\n", "        required: true\n        url: true\n"},
			[]string{`integration "xero"`, "settings[0].url"}},
		{"duplicate setting", []string{"        required: true\n", "        required: true\n      - name: tenant_id\n"},
			[]string{`integration "xero"`, "settings[1].name", "duplicate"}},
		{"check url missing", []string{checkURL, "      method: GET\n"},
			[]string{`integration "xero"`, "check.url: required"}},
		{"url setting not at start", []string{
			"        required: true\n", "        required: true\n      - {name: instance_url, type: url}\n",
			checkURL, "      url: https://api.xero.com/{instance_url}\n"},
			[]string{`integration "xero"`, "check.url", "{instance_url}", "start"}},
		{"text setting at start", []string{checkURL, "      url: \"{tenant_id}/connections\"\n"},
			[]string{`integration "xero"`, "check.url", "{tenant_id}"}},
		{"url setting glued to a host", []string{
			"        required: true\n", "        required: true\n      - {name: instance_url, type: url}\n",
			checkURL, "      url: \"{instance_url}.evil.com/x\"\n"},
			[]string{`integration "xero"`, "check.url", "followed by '/'"}},
		{"host setting not the whole host", []string{
			"        required: true\n", "        required: true\n      - {name: host, type: host}\n",
			checkURL, "      url: https://api.{host}/x\n"},
			[]string{`integration "xero"`, "check.url", "whole host"}},
		{"placeholder in port", []string{checkURL, "      url: https://api.xero.com:{tenant_id}/x\n"},
			[]string{`integration "xero"`, "check.url", "port"}},
		{"userinfo in template", []string{checkURL, "      url: https://me@api.xero.com/x\n"},
			[]string{`integration "xero"`, "check.url", "'@'"}},
		{"base_url placeholder without base_url", []string{checkURL, "      url: \"{base_url}/x\"\n"},
			[]string{`integration "xero"`, "check.url", "base_url"}},
		{"unclosed placeholder", []string{checkURL, "      url: https://api.xero.com/{tenant_id\n"},
			[]string{`integration "xero"`, "check.url", "unclosed"}},
		{"http without allow_http", []string{checkURL, "      url: http://api.xero.com/connections\n"},
			[]string{`integration "xero"`, "check.url", "http"}},
		{"check host not allowed", []string{checkURL, "      url: https://api.xero.com.evil.com/connections\n"},
			[]string{`integration "xero"`, "check.url", "api.xero.com.evil.com"}},
		{"token host not allowed", []string{hosts, "    allowed_hosts: [api.xero.com]\n"},
			[]string{`integration "xero"`, "oauth.token_url", "identity.xero.com"}},
		{"method", []string{checkURL, checkURL + "      method: DELETE\n"},
			[]string{`integration "xero"`, "check.method"}},
		{"header name", []string{checkURL, checkURL + "      headers: {\"Bad Header\": x}\n"},
			[]string{`integration "xero"`, "check.headers.Bad Header"}},
		{"header placeholder", []string{checkURL, checkURL + "      headers: {X-Org: \"{org}\"}\n"},
			[]string{`integration "xero"`, "check.headers.X-Org", "{org}"}},
		{"invalid status", []string{checkURL, checkURL + "      invalid_statuses: [401, 200]\n"},
			[]string{`integration "xero"`, "check.invalid_statuses[1]"}},
		{"assert path", []string{checkURL, checkURL + "      assert: {not_null: true}\n"},
			[]string{`integration "xero"`, "check.assert.path: required"}},
		{"check timeout", []string{checkURL, checkURL + "      timeout: -1s\n"},
			[]string{`integration "xero"`, "check.timeout"}},
		{"check timeout not a duration", []string{checkURL, checkURL + "      timeout: 10\n"},
			[]string{`integration "xero"`, "check.timeout", "invalid duration"}},
		{"auth scheme", []string{checkURL, checkURL + "      auth: {scheme: digest}\n"},
			[]string{`integration "xero"`, "check.auth.scheme"}},
		{"auth field", []string{checkURL, checkURL + "      auth: {scheme: header, name: X-Key, field: secret}\n"},
			[]string{`integration "xero"`, "check.auth.field"}},
		{"auth header name", []string{checkURL, checkURL + "      auth: {scheme: header}\n"},
			[]string{`integration "xero"`, "check.auth.name"}},
		{"oauth missing", []string{oauthBlk, ""},
			[]string{`integration "xero"`, "oauth: required"}},
		{"oauth on api_key", []string{"auth_type: oauth2", "auth_type: api_key\n    credential_fields: [api_key]"},
			[]string{`integration "xero"`, "oauth: only for auth_type oauth2"}},
		{"token url missing", []string{"      token_url: https://identity.xero.com/connect/token\n", ""},
			[]string{`integration "xero"`, "oauth.token_url: required"}},
		{"client id env", []string{"XERO_CLIENT_ID", "xero-client-id"},
			[]string{`integration "xero"`, "oauth.client_id_env"}},
		{"client secret env", []string{"XERO_CLIENT_ID\n", "XERO_CLIENT_ID\n      client_secret_env: $SECRET\n"},
			[]string{`integration "xero"`, "oauth.client_secret_env"}},
		{"auth style", []string{"XERO_CLIENT_ID\n", "XERO_CLIENT_ID\n      auth_style: body\n"},
			[]string{`integration "xero"`, "oauth.auth_style"}},
		{"interval key", []string{hosts, hosts + "    intervals: {authorized: 1h}\n"},
			[]string{`integration "xero"`, "intervals.authorized"}},
		{"interval zero", []string{hosts, hosts + "    intervals: {callable: 0s}\n"},
			[]string{`integration "xero"`, "intervals.callable", "positive"}},
		{"interval not a duration", []string{hosts, hosts + "    intervals:\n      invalid: 10\n"},
			[]string{`integration "xero"`, "intervals.invalid", "invalid duration"}},
		{"refresh window not a duration", []string{hosts, hosts + "    refresh_window: soon\n"},
			[]string{`integration "xero"`, "refresh_window", "invalid duration"}},
		{"refresh window negative", []string{hosts, hosts + "    refresh_window: -5m\n"},
			[]string{`integration "xero"`, "refresh_window"}},
		{"rate limit without requests", []string{hosts, hosts + "    rate_limit: {per: 1m}\n"},
			[]string{`integration "xero"`, "rate_limit.requests"}},
		{"rate limit without per", []string{hosts, hosts + "    rate_limit: {requests: 5}\n"},
			[]string{`integration "xero"`, "rate_limit.per"}},
		{"allowed hosts empty", []string{hosts, "    allowed_hosts: []\n"},
			[]string{`integration "xero"`, "allowed_hosts: required"}},
		{"allowed hosts bad wildcard", []string{hosts, "    allowed_hosts: [\"*.com\", api.xero.com, identity.xero.com]\n"},
			[]string{`integration "xero"`, "allowed_hosts[0]"}},
		{"allowed hosts bad entry", []string{hosts, "    allowed_hosts: [api.xero.com, \"https://identity.xero.com\"]\n"},
			[]string{`integration "xero"`, "allowed_hosts[1]"}},
		{"confirm invalid", []string{hosts, hosts + "    confirm_invalid: -1\n"},
			[]string{`integration "xero"`, "confirm_invalid"}},
		{"invalid wave threshold", []string{hosts, hosts + "    invalid_wave: {threshold: 0}\n"},
			[]string{`integration "xero"`, "invalid_wave.threshold"}},
		{"invalid wave window", []string{hosts, hosts + "    invalid_wave: {threshold: 5, window: -1m}\n"},
			[]string{`integration "xero"`, "invalid_wave.window"}},
		{"confirm spacing", []string{hosts, hosts + "    confirm_spacing: -1m\n"},
			[]string{`integration "xero"`, "confirm_spacing"}},
		{"token lifetime", []string{hosts, hosts + "    token_lifetime: -2h\n"},
			[]string{`integration "xero"`, "token_lifetime"}},
		{"base url host", []string{hosts, hosts + "    base_url: https://127.0.0.1/\n"},
			[]string{`integration "xero"`, "base_url", "127.0.0.1"}},
		{"authorize unknown key", []string{oauthBlk, oauthBlk + "      authorise_url: https://api.xero.com/a\n"},
			[]string{`integration "xero"`, "oauth.authorise_url"}},
		{"authorize host not allowed", []string{oauthBlk, oauthBlk + "      authorize_url: https://login.xero.com/authorize\n"},
			[]string{`integration "xero": oauth.authorize_url`, "login.xero.com"}},
		{"revoke host not allowed", []string{oauthBlk, oauthBlk + "      revoke_url: https://evil.example/revoke\n"},
			[]string{`integration "xero": oauth.revoke_url`, "evil.example"}},
		{"pkce without authorize", []string{oauthBlk, oauthBlk + "      pkce: true\n"},
			[]string{`integration "xero": oauth.pkce: needs oauth.authorize_url`}},
		{"required scope not requested", []string{oauthBlk, oauthBlk + "      scopes: [a]\n      required_scopes: [b]\n"},
			[]string{`integration "xero": oauth.required_scopes[0]: "b" is not one of oauth.scopes`}},
		{"reserved authorize param", []string{oauthBlk, oauthBlk + "      authorize_params: {state: x}\n"},
			[]string{`integration "xero": oauth.authorize_params.state`}},
		{"choices without value", []string{"        required: true\n", "        required: true\n        choices: {url: https://api.xero.com/connections}\n"},
			[]string{`integration "xero": settings[0].choices.value: required`}},
		{"choices unknown key", []string{"        required: true\n", "        required: true\n        choices: {url: https://api.xero.com/connections, value: a, labl: b}\n"},
			[]string{`integration "xero"`, "labl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Zero(t, len(tc.repl)%2)
			doc := baseYAML
			for i := 0; i < len(tc.repl); i += 2 {
				require.Contains(t, doc, tc.repl[i], "the case must change the base")
				doc = strings.Replace(doc, tc.repl[i], tc.repl[i+1], 1)
			}
			c, err := catalog.Parse([]byte(doc))
			require.Error(t, err, doc)
			require.Nil(t, c)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
		})
	}
}

func TestDefaultCatalogAuthorization(t *testing.T) {
	c, err := catalog.Default()
	require.NoError(t, err)
	for _, id := range []string{"salesforce", "hubspot", "xero"} {
		in := integration(t, c, id)
		u, ok, err := in.AuthorizeURL(nil)
		require.NoError(t, err, id)
		require.True(t, ok, id)
		require.Equal(t, "https", u.Scheme, id)
	}
	xero := integration(t, c, "xero")
	require.True(t, xero.OAuth.PKCE)
	require.Equal(t, []string{"accounting.transactions"}, xero.MissingScopes([]string{"offline_access", "accounting.settings"}))
	require.Nil(t, xero.MissingScopes([]string{"offline_access", "accounting.transactions", "openid"}))
	u, ch, ok, err := xero.ChoicesURL("tenant_id", nil)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "https://api.xero.com/connections", u.String())
	require.Equal(t, "tenantId", ch.Value)
	r, ok, err := xero.RevokeURL(nil)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "identity.xero.com", r.Host)
	_, ok, err = integration(t, c, "hubspot").RevokeURL(nil)
	require.NoError(t, err)
	require.False(t, ok, "hubspot revocation is not RFC 7009")
	// Workday's authorize URL lives on the tenant host: settings first.
	_, ok, err = integration(t, c, "workday").AuthorizeURL(nil)
	require.True(t, ok)
	require.ErrorIs(t, err, catalog.ErrMissingSetting)
	w, _, err := integration(t, c, "workday").AuthorizeURL(map[string]string{"host": "wd2-impl-services1.workday.com", "tenant_id": "acme"})
	require.NoError(t, err)
	require.Equal(t, "https://wd2-impl-services1.workday.com/acme/authorize", w.String())
	_, ok, err = integration(t, c, "bamboohr").AuthorizeURL(nil)
	require.NoError(t, err)
	require.False(t, ok)
}

func TestParseTopLevelKeyIsNotBlamedOnAnIntegration(t *testing.T) {
	_, err := catalog.Parse([]byte(baseYAML + "version: 2\n"))
	require.ErrorContains(t, err, "field version not found")
	require.NotContains(t, err.Error(), "xero")
}

func TestParseDocumentErrors(t *testing.T) {
	for name, doc := range map[string]string{
		"empty":           "",
		"no integrations": "integrations: []\n",
		"top-level key":   baseYAML + "version: 2\n",
		"syntax":          "integrations: [\n",
		"two documents":   baseYAML + "---\n" + baseYAML,
		"null entry":      "integrations:\n  -\n",
	} {
		t.Run(name, func(t *testing.T) {
			_, err := catalog.Parse([]byte(doc))
			require.ErrorContains(t, err, "catalog")
		})
	}
}
