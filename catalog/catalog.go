// Package catalog describes integrations as data: how each one authenticates,
// which credentials and settings it needs, how its credentials are checked and
// refreshed, how often, and which hosts a request built from consumer-supplied
// settings may reach.
//
// A catalog is a YAML file. A default one is embedded in the binary
// (default.yaml); VAULTFLEET_CATALOG or --catalog points at another.
package catalog

import (
	"time"
)

// AuthType is how an integration authenticates.
type AuthType string

// Auth types.
const (
	AuthOAuth2 AuthType = "oauth2"
	AuthAPIKey AuthType = "api_key"
	AuthBasic  AuthType = "basic"
)

// Status is the connector status of an integration.
type Status string

// Connector statuses. Only Live and Beta connectors are checked and refreshed.
const (
	StatusLive        Status = "live"
	StatusBeta        Status = "beta"
	StatusEarlyAccess Status = "early-access"
	StatusDevelopment Status = "development"
	StatusConsidering Status = "considering"
)

// Checkable reports whether connections of a connector with this status are
// validated and refreshed.
func (s Status) Checkable() bool { return s == StatusLive || s == StatusBeta }

// Well-known credential field names, shared across integrations.
const (
	FieldAccessToken  = "access_token"
	FieldRefreshToken = "refresh_token"
	FieldExpiresAt    = "expires_at"
	FieldAPIKey       = "api_key"
	FieldUsername     = "username"
	FieldPassword     = "password"
)

// Catalog is a loaded, validated set of integrations.
type Catalog struct {
	// Integrations in file order.
	Integrations []*Integration
	byID         map[string]*Integration
}

// Integration is one entry of the catalog.
type Integration struct {
	// ID is the lower-case service id, e.g. "salesforce".
	ID string `yaml:"id"`
	// Name is the display name, e.g. "Salesforce".
	Name string `yaml:"name"`
	// UnifiedAPI is one of crm, hris, accounting, ticketing, ...
	UnifiedAPI string `yaml:"unified_api"`
	// AuthType is oauth2, api_key or basic.
	AuthType AuthType `yaml:"auth_type"`
	// Status is the connector status.
	Status Status `yaml:"status"`
	// CredentialFields are the credential fields the consumer must supply
	// (for oauth2 the tokens come from the authorization flow and this may
	// be empty). A connection whose required field is empty is `added`.
	CredentialFields []string `yaml:"credential_fields"`
	// Settings are the consumer settings the integration knows.
	Settings []Setting `yaml:"settings"`
	// BaseURL is the API base URL; check and token URL templates may use
	// {base_url}.
	BaseURL string `yaml:"base_url"`
	// Check is the request that tells whether credentials work.
	Check Check `yaml:"check"`
	// OAuth holds the token endpoint and client credentials (auth_type oauth2).
	OAuth *OAuth `yaml:"oauth"`
	// Intervals between periodic checks, by connection state ("callable",
	// "invalid", "added"). Defaults: callable 1h, invalid 6h, added 1h.
	Intervals map[string]Duration `yaml:"intervals"`
	// RefreshWindow is how long before expiry a token is refreshed. If zero,
	// 10 minutes or 20% of the token lifetime, whichever is shorter.
	RefreshWindow Duration `yaml:"refresh_window"`
	// RateLimit is the fleet-wide limit on calls to this provider.
	RateLimit RateLimit `yaml:"rate_limit"`
	// AllowedHosts lists the hosts that request URLs (check, token) may
	// point at. Entries are exact host names ("api.xero.com"), wildcard
	// suffixes ("*.my.salesforce.com", which does not match the bare
	// suffix), or host:port. IP literals are refused unless listed exactly.
	// The hosts of the literal parts of the URL templates must be listed too.
	AllowedHosts []string `yaml:"allowed_hosts"`
	// AllowHTTP permits plain http:// URLs (simulated providers in dev and
	// tests only). Default: https only.
	AllowHTTP bool `yaml:"allow_http"`
	// ConfirmInvalid is how many further checks, spaced ConfirmSpacing apart,
	// must also say "invalid" before the state flips. Zero flips at once.
	ConfirmInvalid int `yaml:"confirm_invalid"`
	// ConfirmSpacing separates confirming checks. Default 1m.
	ConfirmSpacing Duration `yaml:"confirm_spacing"`
	// TokenLifetime is assumed for tokens whose response carries no
	// expires_in (Salesforce). Default 2h.
	TokenLifetime Duration `yaml:"token_lifetime"`
	// InvalidWave, when set, holds back invalid check verdicts for this
	// integration once more than Threshold arrive fleet wide within one
	// Window: a sudden wave looks like a provider auth incident rather than
	// mass revocation. Held verdicts are logged, counted and retried after
	// the window; state does not change meanwhile.
	InvalidWave *InvalidWave `yaml:"invalid_wave"`
}

// InvalidWave is the threshold of the invalid-wave guard.
type InvalidWave struct {
	// Threshold is how many invalid verdicts per Window are applied.
	Threshold int `yaml:"threshold"`
	// Window is the counting window. Default 10m.
	Window Duration `yaml:"window"`
}

// Setting is a consumer setting such as instance_url or tenant_id.
type Setting struct {
	Name string `yaml:"name"`
	// Required means a connection without it cannot be checked: for oauth2
	// integrations it is required after authorization (state `authorized`
	// until set); for others it is needed like a credential (state `added`).
	Required bool `yaml:"required"`
	// Type says what the value is and how it is checked and substituted:
	// SettingURL (a whole URL such as Salesforce's instance_url: scheme and
	// host come from it, checked against AllowedHosts; only at the very
	// start of a template), SettingHost (a whole host name such as
	// Workday's host, checked against AllowedHosts) or SettingText (the
	// default: one escaped path segment, or a DNS label when it sits in the
	// host part of a template, e.g. https://{subdomain}.zendesk.com).
	Type string `yaml:"type"`
	// AffectsCheck means changing the value bumps the credentials revision
	// (old verdicts no longer apply). Settings used in a URL template always
	// affect the check.
	AffectsCheck bool `yaml:"affects_check"`
	// Choices, for a setting picked after authorization (Xero's tenant),
	// is where the provider lists the values the consumer may pick.
	Choices *Choices `yaml:"choices"`
	// FromToken names a field of the token endpoint's answer that sets
	// this setting when the connect flow completes (Salesforce's
	// instance_url).
	FromToken string `yaml:"from_token"`
}

// Choices is a provider endpoint listing the values of a setting: a GET
// with the connection's access token as bearer, answering a JSON array of
// objects.
type Choices struct {
	// URL is a template like the check URL.
	URL string `yaml:"url"`
	// Value and Label name the fields of each object holding the value
	// and its display name (e.g. tenantId, tenantName).
	Value string `yaml:"value"`
	Label string `yaml:"label"`
}

// Setting types (Setting.Type).
const (
	SettingURL  = "url"
	SettingHost = "host"
	SettingText = "text"
)

// Check describes the validation request.
type Check struct {
	// Method defaults to GET.
	Method string `yaml:"method"`
	// URL is a template: {base_url} and {setting_name} are replaced.
	URL string `yaml:"url"`
	// Headers added to the request (values may use templates too).
	Headers map[string]string `yaml:"headers"`
	// Auth says how credentials go on the request.
	Auth CheckAuth `yaml:"auth"`
	// InvalidStatuses mean the credentials were rejected. Default 401, 403.
	InvalidStatuses []int `yaml:"invalid_statuses"`
	// Assert, when set, must hold on the JSON body of a 2xx answer;
	// otherwise the verdict is invalid (Zendesk answers 200 to anonymous
	// callers: assert user.id not null).
	Assert *Assertion `yaml:"assert"`
	// Timeout for the whole check request. Default 10s.
	Timeout Duration `yaml:"timeout"`
}

// CheckAuth says how credentials are put on a check request.
type CheckAuth struct {
	// Scheme is bearer (access_token or api_key as a bearer token), header
	// (Name: value of Field), query (?Name=value of Field) or basic
	// (Username/Password are field names; an empty Password sends "").
	// Defaults: oauth2 bearer; api_key header X-API-Key from api_key; basic
	// basic from username/password.
	Scheme string `yaml:"scheme"`
	// Name is the header or query parameter name.
	Name string `yaml:"name"`
	// Field is the credential field sent (header, query, bearer).
	Field string `yaml:"field"`
	// Prefix is put before the value in a header (e.g. "Token token=").
	Prefix string `yaml:"prefix"`
	// Username and Password name credential fields (basic). A value of the
	// form "literal:x" sends x itself (BambooHR: the API key as user, "x"
	// as password).
	Username string `yaml:"username"`
	Password string `yaml:"password"`
}

// Assertion is a condition on the JSON body of a check answer.
type Assertion struct {
	// Path is a dotted path into the JSON body, e.g. "user.id".
	Path string `yaml:"path"`
	// NotNull requires the value at Path to exist and not be null.
	NotNull bool `yaml:"not_null"`
}

// OAuth configures the token endpoint.
type OAuth struct {
	// TokenURL is a template like the check URL.
	TokenURL string `yaml:"token_url"`
	// ClientIDEnv and ClientSecretEnv name environment variables holding
	// the client credentials.
	ClientIDEnv     string `yaml:"client_id_env"`
	ClientSecretEnv string `yaml:"client_secret_env"`
	// AuthStyle is "header" (HTTP basic, the default) or "params".
	AuthStyle string `yaml:"auth_style"`
	// Scopes requested on authorization, if any.
	Scopes []string `yaml:"scopes"`
	// GrantType is how access tokens are obtained: GrantAuthorizationCode
	// (the default: the consumer authorizes, the fleet refreshes) or
	// GrantClientCredentials (the token is fetched with the connection's
	// client_id/client_secret credential fields, or the integration's own
	// client when the catalog declares no such fields).
	GrantType string `yaml:"grant_type"`
	// AuthorizeURL is the provider's authorization endpoint, a template
	// like the token URL; without it the connect flow is not offered.
	AuthorizeURL string `yaml:"authorize_url"`
	// PKCE sends an S256 code challenge on authorization (RFC 7636).
	PKCE bool `yaml:"pkce"`
	// AuthorizeParams are extra query parameters of the authorization
	// request (e.g. prompt=consent).
	AuthorizeParams map[string]string `yaml:"authorize_params"`
	// RequiredScopes must all be granted for the connection to be
	// callable; each must be one of Scopes.
	RequiredScopes []string `yaml:"required_scopes"`
	// RevokeURL is an RFC 7009 revocation endpoint (a template), called
	// with the refresh token when a consumer disconnects.
	RevokeURL string `yaml:"revoke_url"`
}

// OAuth grant types (OAuth.GrantType).
const (
	GrantAuthorizationCode = "authorization_code"
	GrantClientCredentials = "client_credentials"
)

// Credential fields of a client-credentials connection.
const (
	FieldClientID     = "client_id"
	FieldClientSecret = "client_secret"
)

// GrantType returns the OAuth grant type of an oauth2 integration
// (GrantAuthorizationCode unless the catalog says otherwise), "" for others.
func (in *Integration) GrantType() string {
	switch {
	case in.AuthType != AuthOAuth2:
		return ""
	case in.OAuth != nil && in.OAuth.GrantType != "":
		return in.OAuth.GrantType
	}
	return GrantAuthorizationCode
}

// RateLimit is a number of requests per period.
type RateLimit struct {
	Requests int      `yaml:"requests"`
	Per      Duration `yaml:"per"`
}

// Duration is a time.Duration that reads "90s", "1h", "10m" in YAML.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// ClientFor returns the OAuth client of a client-credentials connection:
// its own client_id/client_secret credential fields (get reads them) when
// the catalog declares them, else the integration's client from the
// environment variables the catalog names (fromEnv true).
func (in *Integration) ClientFor(get, getenv func(string) string) (id, secret string, fromEnv bool) {
	for _, f := range in.CredentialFields {
		if f == FieldClientID {
			return get(FieldClientID), get(FieldClientSecret), false
		}
	}
	if in.OAuth == nil || in.OAuth.ClientIDEnv == "" {
		return "", "", true
	}
	return getenv(in.OAuth.ClientIDEnv), getenv(in.OAuth.ClientSecretEnv), true
}
