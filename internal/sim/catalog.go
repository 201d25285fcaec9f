package sim

import (
	"bytes"
	"net/url"
	"text/template"
	"time"
)

// devCatalog is the catalog of the simulated providers. Every URL points
// at a loopback listener, so each entry allows http and exactly its own
// 127.0.0.1:port.
var devCatalog = template.Must(template.New("catalog").Parse(`# Integration catalog of the simulated providers of vaultfleet dev
# (package internal/sim): the same schema as catalog/default.yaml, with
# every URL pointing at a loopback listener of this process (hence
# allow_http and the 127.0.0.1:port hosts) and timings shortened so that
# states flip while you watch.

integrations:
  - id: salesforce
    name: Salesforce
    unified_api: crm
    auth_type: oauth2
    status: live
    base_url: {{.Salesforce}}
    settings:
      # The org's instance URL, returned as instance_url by the token
      # endpoint.
      - name: instance_url
        type: url
        required: true
        from_token: instance_url
    check:
      url: "{instance_url}/services/oauth2/userinfo"
      timeout: 5s
    oauth:
      token_url: "{base_url}/services/oauth2/token"
      client_id_env: SALESFORCE_CLIENT_ID
      client_secret_env: SALESFORCE_CLIENT_SECRET
      auth_style: params
      # A login and consent page (any user, password "demo").
      authorize_url: "{base_url}/services/oauth2/authorize"
      pkce: true
      scopes: [api, refresh_token]
      required_scopes: [api, refresh_token]
      revoke_url: "{base_url}/services/oauth2/revoke"
    # Token answers carry no expires_in: this is the simulated session
    # timeout.
    token_lifetime: {{.SalesforceTTL}}
    refresh_window: {{.RefreshWindow}}
    intervals: {callable: {{.Callable}}, invalid: {{.Invalid}}, added: {{.Added}}}
    allow_http: true
    allowed_hosts: ["{{.SalesforceHost}}"]

  - id: bamboohr
    name: BambooHR
    unified_api: hris
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    base_url: {{.BambooHR}}
    settings:
      - name: subdomain
        type: text
        required: true
    check:
      url: "{base_url}/api/gateway.php/{subdomain}/v1/meta/fields"
      headers:
        Accept: application/json
      auth:
        scheme: basic
        username: api_key
        password: literal:x
      # An unknown subdomain answers 404: the settings are wrong.
      invalid_statuses: [401, 403, 404]
      timeout: 5s
    intervals: {callable: {{.Callable}}, invalid: {{.Invalid}}, added: {{.Added}}}
    allow_http: true
    allowed_hosts: ["{{.BambooHRHost}}"]

  - id: xero
    name: Xero
    unified_api: accounting
    auth_type: oauth2
    status: live
    base_url: {{.Xero}}
    settings:
      # Chosen after authorization: connections sit in authorized until
      # it is set.
      - name: tenant_id
        type: text
        required: true
        affects_check: true
        choices:
          url: "{base_url}/connections"
          value: tenantId
          label: tenantName
    check:
      url: "{base_url}/connections"
      timeout: 5s
    oauth:
      token_url: "{base_url}/connect/token"
      client_id_env: XERO_CLIENT_ID
      client_secret_env: XERO_CLIENT_SECRET
      authorize_url: "{base_url}/identity/connect/authorize"
      pkce: true
      scopes: [offline_access, accounting.settings, accounting.transactions]
      required_scopes: [offline_access, accounting.transactions]
      revoke_url: "{base_url}/connect/revocation"
    token_lifetime: {{.XeroTTL}}
    refresh_window: {{.RefreshWindow}}
    confirm_invalid: 1
    confirm_spacing: {{.ConfirmSpacing}}
    intervals: {callable: {{.Callable}}, invalid: {{.Invalid}}, added: {{.Added}}}
    allow_http: true
    allowed_hosts: ["{{.XeroHost}}"]

  - id: pipedrive
    name: Pipedrive
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    base_url: {{.Pipedrive}}
    check:
      url: "{base_url}/v1/users/me"
      auth:
        scheme: header
        name: x-api-token
        field: api_key
      timeout: 5s
    # The flaky one: outages of 5xx and 429 that must never invalidate.
    intervals: {callable: {{.Callable}}, invalid: {{.Invalid}}, added: {{.Added}}}
    allow_http: true
    allowed_hosts: ["{{.PipedriveHost}}"]
`))

// CatalogYAML returns a catalog (the schema of catalog/default.yaml) whose
// integrations salesforce, bamboohr, xero and pipedrive point at the
// simulated providers, with the shortened intervals, token lifetimes and
// refresh windows of the Timings in effect.
func (p *Providers) CatalogYAML() []byte {
	host := func(id string) string {
		u, err := url.Parse(p.BaseURL(id))
		if err != nil {
			return ""
		}
		return u.Host
	}
	t := p.t
	var b bytes.Buffer
	err := devCatalog.Execute(&b, map[string]string{
		"Salesforce": p.BaseURL(Salesforce), "SalesforceHost": host(Salesforce),
		"BambooHR": p.BaseURL(BambooHR), "BambooHRHost": host(BambooHR),
		"Xero": p.BaseURL(Xero), "XeroHost": host(Xero),
		"Pipedrive": p.BaseURL(Pipedrive), "PipedriveHost": host(Pipedrive),
		"SalesforceTTL":  dur(p.sf.flavor.ttl),
		"XeroTTL":        dur(p.xero.flavor.ttl),
		"RefreshWindow":  dur(t.RefreshWindow),
		"ConfirmSpacing": dur(t.ConfirmSpacing),
		"Callable":       dur(t.CallableEvery),
		"Invalid":        dur(t.InvalidEvery),
		"Added":          dur(t.AddedEvery),
	})
	if err != nil {
		// The template and its data are fixed: a failure is a bug here.
		panic("sim: catalog template: " + err.Error())
	}
	return b.Bytes()
}

// dur writes a duration for the catalog: whole seconds, at least one.
func dur(d time.Duration) string {
	return max(time.Second, d.Round(time.Second)).String()
}
