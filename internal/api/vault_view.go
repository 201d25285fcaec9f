package api

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

const timeRFC3339 = time.RFC3339

func parseTime(v string) (time.Time, error) { return time.Parse(time.RFC3339Nano, v) }

func secondsDuration(n int64) time.Duration {
	const maxSeconds = int64(10 * 365 * 24 * 3600)
	return time.Duration(min(n, maxSeconds)) * time.Second
}

// vaultConnection is Apideck's Connection. It has no field that holds a
// credential value: settings carry the integration's settings only, and
// form_fields describe credential fields without a value.
type vaultConnection struct {
	ID               string          `json:"id"`
	ServiceID        string          `json:"service_id"`
	Name             string          `json:"name"`
	UnifiedAPI       string          `json:"unified_api"`
	State            state.State     `json:"state"`
	IntegrationState string          `json:"integration_state"`
	AuthType         string          `json:"auth_type"`
	OAuthGrantType   string          `json:"oauth_grant_type,omitempty"`
	Status           string          `json:"status"`
	Enabled          bool            `json:"enabled"`
	Settings         map[string]any  `json:"settings"`
	Metadata         json.RawMessage `json:"metadata"`
	FormFields       []formField     `json:"form_fields"`
	// Configuration, custom mappings, resources, subscriptions and consents
	// are not offered: always empty.
	Configuration                    []struct{} `json:"configuration"`
	ConfigurableResources            []string   `json:"configurable_resources"`
	ResourceSchemaSupport            []string   `json:"resource_schema_support"`
	ResourceSettingsSupport          []string   `json:"resource_settings_support"`
	ValidationSupport                bool       `json:"validation_support"`
	SchemaSupport                    bool       `json:"schema_support"`
	SettingsRequiredForAuthorization []string   `json:"settings_required_for_authorization"`
	Subscriptions                    []struct{} `json:"subscriptions"`
	HasGuide                         bool       `json:"has_guide"`
	CustomMappings                   []struct{} `json:"custom_mappings"`
	Consents                         []struct{} `json:"consents"`
	Health                           string     `json:"health"`
	// HealthDetail is vaultfleet's own health value where Apideck has no
	// equivalent (misconfigured, rotation_lost); Health carries the mapped
	// one. Equal to Health otherwise.
	HealthDetail string `json:"health_detail"`
	// CredentialsExpireAt is always 0: vaultfleet never deletes
	// credentials after refresh failures.
	CredentialsExpireAt   int64  `json:"credentials_expire_at"`
	LastRefreshFailedAt   int64  `json:"last_refresh_failed_at"`
	LastDownstreamErrorAt int64  `json:"last_downstream_error_at"`
	CreatedAt             int64  `json:"created_at,omitempty"`
	UpdatedAt             *int64 `json:"updated_at"`
	// AuthorizeURL starts the OAuth connect flow (GET .../authorize with a
	// session or operator token); RevokeURL is where the provider revokes
	// the grant when the consumer disconnects. Empty when not offered.
	AuthorizeURL string `json:"authorize_url,omitempty"`
	RevokeURL    string `json:"revoke_url,omitempty"`
}

// formField is Apideck's FormField.
type formField struct {
	ID                string `json:"id"`
	Label             string `json:"label"`
	Type              string `json:"type"`
	Required          bool   `json:"required"`
	CustomField       bool   `json:"custom_field"`
	AllowCustomValues bool   `json:"allow_custom_values"`
	Disabled          bool   `json:"disabled"`
	Hidden            bool   `json:"hidden"`
	Sensitive         bool   `json:"sensitive"`
}

// VaultAuthType maps a catalog auth type onto Apideck's AuthType.
func VaultAuthType(a catalog.AuthType) string {
	switch a {
	case catalog.AuthAPIKey:
		return "apiKey"
	case catalog.AuthOAuth2, catalog.AuthBasic:
		return string(a)
	}
	return "custom"
}

// VaultStatus maps a connector status onto Apideck's connection status:
// connectors vaultfleet checks (live, beta) are live, the others upcoming.
func VaultStatus(s catalog.Status) string {
	if s.Checkable() {
		return "live"
	}
	return "upcoming"
}

// VaultIntegrationState is Apideck's integration_state of an integration:
// configured when vaultfleet checks its connector, disabled otherwise.
func VaultIntegrationState(in *catalog.Integration) string {
	if in == nil || !in.Checkable() {
		return "disabled"
	}
	return "configured"
}

// VaultHealth maps vaultfleet's health onto Apideck's Health. The values
// they share mean the same, except pending_confirmation (see README:
// Apideck uses it for an OAuth confirmation step, vaultfleet for an
// invalid verdict awaiting its confirming checks). misconfigured (the
// consumer's own settings or credentials make a request impossible) and
// rotation_lost (the fleet lost a rotated refresh token) both call for the
// consumer to enter or authorize the connection again: needs_auth.
func VaultHealth(h state.Health) string { return string(h.Apideck()) }

// vaultView renders c (nil: not added) of integration in (nil: left the
// catalog) at now.
func vaultView(c *state.Connection, in *catalog.Integration, now time.Time) vaultConnection {
	v := vaultConnection{
		Settings: map[string]any{}, FormFields: []formField{}, Configuration: []struct{}{},
		ConfigurableResources: []string{}, ResourceSchemaSupport: []string{}, ResourceSettingsSupport: []string{},
		SettingsRequiredForAuthorization: []string{}, Subscriptions: []struct{}{}, CustomMappings: []struct{}{},
		Consents: []struct{}{}, Metadata: json.RawMessage("null"), IntegrationState: VaultIntegrationState(in),
	}
	var st state.State
	var health state.Health
	if in != nil {
		v.ID, v.ServiceID, v.UnifiedAPI, v.Name = state.ConnectionID(in.UnifiedAPI, in.ID), in.ID, in.UnifiedAPI, in.Name
		v.AuthType, v.OAuthGrantType, v.Status = VaultAuthType(in.AuthType), in.GrantType(), VaultStatus(in.Status)
		v.ValidationSupport = in.Checkable() && in.Check.URL != ""
		v.FormFields = formFields(in)
		if in.AuthType != catalog.AuthOAuth2 {
			for _, s := range in.Settings {
				if s.Required {
					v.SettingsRequiredForAuthorization = append(v.SettingsRequiredForAuthorization, s.Name)
				}
			}
		}
		st, health = state.Derive(c, in, now)
	}
	if c != nil {
		v.ID, v.ServiceID, v.UnifiedAPI = c.ID, c.ServiceID, c.UnifiedAPI
		if in == nil {
			v.Name, v.AuthType, v.Status = c.ServiceID, "custom", "upcoming"
			st, health = c.State, c.Health
		}
		v.Enabled = c.Enabled
		for k, val := range c.Settings {
			if val != "" && (in == nil || !isCredentialField(in, k)) {
				v.Settings[k] = val
			}
		}
		if len(c.Metadata) > 0 {
			v.Metadata = c.Metadata
		}
		if c.Refresh.Failures > 0 {
			v.LastRefreshFailedAt = c.Refresh.LastAt.UnixMilli()
		}
		if c.Transient.Failures > 0 {
			v.LastDownstreamErrorAt = c.Transient.LastAt.UnixMilli()
		}
		v.CreatedAt = c.CreatedAt.UnixMilli()
		u := c.UpdatedAt.UnixMilli()
		v.UpdatedAt = &u
	}
	v.State, v.Health, v.HealthDetail = st, VaultHealth(health), string(health)
	if v.HealthDetail == "" {
		v.HealthDetail = v.Health
	}
	return v
}

func isCredentialField(in *catalog.Integration, k string) bool {
	for _, f := range in.CredentialFields {
		if f == k {
			return true
		}
	}
	return false
}

// formFields describes what a consumer fills in: the credential fields
// (sensitive, a password input, never a value) and the settings.
func formFields(in *catalog.Integration) []formField {
	out := make([]formField, 0, len(in.CredentialFields)+len(in.Settings))
	for _, f := range in.CredentialFields {
		out = append(out, formField{ID: f, Label: label(f), Type: "password", Required: true, Sensitive: true})
	}
	for _, s := range in.Settings {
		typ := "text"
		if s.Type == catalog.SettingURL {
			typ = "url"
		}
		out = append(out, formField{ID: s.Name, Label: label(s.Name), Type: typ, Required: s.Required})
	}
	return out
}

// label turns a snake_case name into words: "api_key" -> "Api key".
func label(name string) string {
	s := strings.ReplaceAll(name, "_", " ")
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
