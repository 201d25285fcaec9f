// Package state holds the connection model, the pure rule that derives a
// connection's state and health from its facts, and the Redis store.
//
// It is vaultfleet's one Redis door: every Lua script (state/lua), key
// layout and Redis command of the fleet's own data is here. Besides Store
// (connections, consumers, due indexes, the refresh fence), small types
// serve the other packages, each of which declares the interface it needs:
// RateLimiter and WaveCounter (the worker's fleet-wide limits), EventStream
// (the webhook relay's consumer group and reads), FlowStates (the connect
// flow's one-time OAuth states). Outside state, only the process wiring
// (cmd), asynq's own connection and test helpers hold a go-redis client;
// door_test.go keeps it so.
package state

import (
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// State is where a connection stands in the connection flow. It is derived
// from facts by Derive, never set by hand.
type State string

// States, with exactly the strings of the Vault API.
const (
	Available  State = "available"
	Added      State = "added"
	Authorized State = "authorized"
	Invalid    State = "invalid"
	Callable   State = "callable"
)

// States returns every state in flow order (a fresh slice).
func States() []State { return []State{Available, Added, Authorized, Invalid, Callable} }

// Health says how a connection is doing within its state.
type Health string

// Health values.
const (
	HealthOK                  Health = "ok"
	HealthPendingRefresh      Health = "pending_refresh"
	HealthPendingConfirmation Health = "pending_confirmation"
	HealthDegraded            Health = "degraded"
	HealthNeedsAuth           Health = "needs_auth"
	HealthRevoked             Health = "revoked"
	HealthMissingSettings     Health = "missing_settings"
	// HealthMisconfigured: the consumer's own settings or credentials make
	// a request impossible (a host that does not resolve, a refused
	// redirect, a value that is not a valid header). That connection's
	// problem alone, never a provider incident.
	HealthMisconfigured Health = "misconfigured"
	// HealthRotationLost: a refresh answered invalid_grant while an earlier
	// exchange of the same refresh token by the fleet had an unknown
	// outcome: the fleet lost a rotated token, the user did not revoke.
	HealthRotationLost Health = "rotation_lost"
	// HealthMissingScopes: the consumer granted fewer scopes than the
	// catalog's required_scopes at the last authorization.
	HealthMissingScopes Health = "missing_scopes"
)

// Healths returns every health value (a fresh slice).
func Healths() []Health {
	return []Health{HealthOK, HealthPendingRefresh, HealthPendingConfirmation,
		HealthDegraded, HealthNeedsAuth, HealthRevoked, HealthMissingSettings,
		HealthMisconfigured, HealthRotationLost, HealthMissingScopes}
}

// Outcome is the meaning of a definitive check or refresh result.
type Outcome string

// Verdict outcomes. Transient results are not verdicts.
const (
	OutcomeValid   Outcome = "valid"
	OutcomeInvalid Outcome = "invalid"
)

// Verdict reasons used by the fleet.
const (
	ReasonCheckPassed          = "check_passed"
	ReasonCredentialsRejected  = "credentials_rejected"
	ReasonAssertionFailed      = "assertion_failed"
	ReasonRefreshTokenRevoked  = "refresh_token_revoked"
	ReasonMisconfiguredAccount = "misconfigured_account"
	// ReasonRotationLost: invalid_grant for a refresh token whose earlier
	// exchange by the fleet has an unknown outcome (see HealthRotationLost).
	ReasonRotationLost = "rotation_lost"
)

// ExpirySkew is how close to expiry an access token counts as expired, at
// most: a token's skew is the smaller of ExpirySkew and a tenth of its
// lifetime, so that a token living a minute is not expired when issued.
const ExpirySkew = time.Minute

// expirySkewShare is the share of a token's lifetime its expiry skew may
// take (10%).
const expirySkewShare = 10

// skewFor is the expiry skew of c's token.
func skewFor(c Credentials) time.Duration {
	if !c.IssuedAt.IsZero() && c.ExpiresAt.After(c.IssuedAt) {
		return min(ExpirySkew, c.ExpiresAt.Sub(c.IssuedAt)/expirySkewShare)
	}
	return ExpirySkew
}

// Credentials are a connection's secrets. They are encrypted at rest and
// never appear in a task payload, log line, metric label or error string.
type Credentials struct {
	AccessToken  string    `json:"access_token,omitempty"`
	RefreshToken string    `json:"refresh_token,omitempty"`
	ExpiresAt    time.Time `json:"expires_at,omitzero"`
	// IssuedAt is when the current access token was obtained; with
	// ExpiresAt it gives the token lifetime for the refresh window.
	IssuedAt time.Time `json:"issued_at,omitzero"`
	APIKey   string    `json:"api_key,omitempty"`
	Username string    `json:"username,omitempty"`
	Password string    `json:"password,omitempty"`
	// Extra holds any other field the catalog declares.
	Extra map[string]string `json:"extra,omitempty"`
}

// Get returns the credential field by its catalog name.
func (c Credentials) Get(field string) string {
	switch field {
	case catalog.FieldAccessToken:
		return c.AccessToken
	case catalog.FieldRefreshToken:
		return c.RefreshToken
	case catalog.FieldExpiresAt:
		if c.ExpiresAt.IsZero() {
			return ""
		}
		return c.ExpiresAt.UTC().Format(time.RFC3339)
	case catalog.FieldAPIKey:
		return c.APIKey
	case catalog.FieldUsername:
		return c.Username
	case catalog.FieldPassword:
		return c.Password
	}
	return c.Extra[field]
}

// Set sets the credential field by its catalog name. expires_at takes an
// RFC 3339 time; a malformed one is an error.
func (c *Credentials) Set(field, value string) error {
	switch field {
	case catalog.FieldAccessToken:
		c.AccessToken = value
	case catalog.FieldRefreshToken:
		c.RefreshToken = value
	case catalog.FieldExpiresAt:
		if value == "" {
			c.ExpiresAt = time.Time{}
			return nil
		}
		t, err := time.Parse(time.RFC3339, value)
		if err != nil {
			return &FieldError{Field: "credentials.expires_at", Msg: "not an RFC 3339 time"}
		}
		c.ExpiresAt = t.UTC()
	case catalog.FieldAPIKey:
		c.APIKey = value
	case catalog.FieldUsername:
		c.Username = value
	case catalog.FieldPassword:
		c.Password = value
	default:
		if c.Extra == nil {
			c.Extra = map[string]string{}
		}
		if value == "" {
			delete(c.Extra, field)
		} else {
			c.Extra[field] = value
		}
	}
	return nil
}

// Fields lists the names of the credential fields that are set (never their
// values), sorted.
func (c Credentials) Fields() []string {
	var out []string
	for _, f := range []string{catalog.FieldAccessToken, catalog.FieldAPIKey, catalog.FieldExpiresAt,
		catalog.FieldPassword, catalog.FieldRefreshToken, catalog.FieldUsername} {
		if c.Get(f) != "" {
			out = append(out, f)
		}
	}
	for k, v := range c.Extra {
		if v != "" {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// Equal reports whether two credential sets hold the same values.
func (c Credentials) Equal(o Credentials) bool {
	if c.AccessToken != o.AccessToken || c.RefreshToken != o.RefreshToken ||
		!c.ExpiresAt.Equal(o.ExpiresAt) || c.APIKey != o.APIKey ||
		c.Username != o.Username || c.Password != o.Password || len(c.Extra) != len(o.Extra) {
		return false
	}
	for k, v := range c.Extra {
		if o.Extra[k] != v {
			return false
		}
	}
	return true
}

// Verdict is the outcome of the latest definitive check or refresh.
type Verdict struct {
	Outcome    Outcome   `json:"outcome"`
	Reason     string    `json:"reason,omitempty"`
	HTTPStatus int       `json:"http_status,omitempty"`
	CheckedAt  time.Time `json:"checked_at"`
	// Revision is the credentials revision the verdict was computed for. A
	// verdict for another revision does not decide the state.
	Revision int64 `json:"revision"`
	// Lineage names the refresh token a refresh verdict is about (see
	// state.Lineage), empty for check verdicts.
	Lineage string `json:"lineage,omitempty"`
}

// Transient records provider trouble that did not change the state.
type Transient struct {
	// Failures counts consecutive transient check failures; the first
	// definitive result clears it.
	Failures  int       `json:"failures,omitempty"`
	LastError string    `json:"last_error,omitempty"`
	LastAt    time.Time `json:"last_at,omitzero"`
	// Misconfigured says the latest failure was the consumer's own, not
	// the provider's: a host from its settings that does not resolve or
	// refuses connections, a redirect the catalog refuses. Health is then
	// misconfigured instead of degraded; the state is kept.
	Misconfigured bool `json:"misconfigured,omitempty"`
}

// Confirmation tracks invalid verdicts awaiting confirmation for the
// current revision.
type Confirmation struct {
	// Invalids counts invalid results seen so far for Revision.
	Invalids int       `json:"invalids,omitempty"`
	Revision int64     `json:"revision,omitempty"`
	Reason   string    `json:"reason,omitempty"`
	Status   int       `json:"status,omitempty"`
	FirstAt  time.Time `json:"first_at,omitzero"`
}

// RefreshStatus records failing token refreshes (transient ones: a revoked
// refresh token is a verdict).
type RefreshStatus struct {
	Failures  int       `json:"failures,omitempty"`
	LastError string    `json:"last_error,omitempty"`
	LastAt    time.Time `json:"last_at,omitzero"`
	// RefreshedAt is when tokens were last refreshed by the fleet.
	RefreshedAt time.Time `json:"refreshed_at,omitzero"`
}

// Connection links a consumer to an integration.
type Connection struct {
	// ID is "{unified_api}+{service_id}", unique per consumer.
	ID          string            `json:"id"`
	ConsumerID  string            `json:"consumer_id"`
	ServiceID   string            `json:"service_id"`
	UnifiedAPI  string            `json:"unified_api"`
	Enabled     bool              `json:"enabled"`
	Credentials Credentials       `json:"-"`
	Settings    map[string]string `json:"settings,omitempty"`
	// Metadata is the caller's own JSON object attached to the connection
	// (Apideck's connection metadata); nil when none. Not a secret.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// Verdict is the latest definitive result, nil before the first.
	Verdict      *Verdict      `json:"verdict,omitempty"`
	Transient    Transient     `json:"transient,omitzero"`
	Confirmation Confirmation  `json:"confirmation,omitzero"`
	Refresh      RefreshStatus `json:"refresh,omitzero"`
	// GrantedScopes are the scopes the provider granted at the last
	// authorization through the connect flow; nil when unknown (tokens
	// written by hand), which judges nothing.
	GrantedScopes []string `json:"granted_scopes,omitempty"`
	// Revision is the credentials revision: bumped when credentials or a
	// setting the check depends on change (not by a token refresh).
	Revision int64 `json:"revision"`
	// Version is bumped by every write; writes compare and set on it.
	Version int64 `json:"version"`
	// State and Health are derived by Derive and stored beside the facts.
	State     State     `json:"state"`
	Health    Health    `json:"health"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
	// CredentialsKeyID is the id of the encryption key that sealed the
	// stored credentials ("" when there are none). Not a secret.
	CredentialsKeyID string `json:"credentials_key_id,omitempty"`
	// Unreadable is set when the stored credentials cannot be opened (the
	// key that sealed them left the keyring, or the value is corrupt):
	// Credentials are empty and State and Health are the stored ones. Only
	// listings and an *UnreadableError carry such a connection.
	Unreadable bool `json:"unreadable,omitempty"`
}

// Ref names a connection in the store.
type Ref struct {
	ConsumerID   string
	ConnectionID string
}

// String returns "consumer|connection".
func (r Ref) String() string { return r.ConsumerID + "|" + r.ConnectionID }

// Ref returns the connection's reference.
func (c *Connection) Ref() Ref { return Ref{ConsumerID: c.ConsumerID, ConnectionID: c.ID} }

// ConnectionID returns "{unified_api}+{service_id}".
func ConnectionID(unifiedAPI, serviceID string) string { return unifiedAPI + "+" + serviceID }

// SplitConnectionID splits "{unified_api}+{service_id}".
func SplitConnectionID(id string) (unifiedAPI, serviceID string, ok bool) {
	return strings.Cut(id, "+")
}

// Derive computes the state and health of c against its integration at now.
// It is pure: the same inputs give the same result. c == nil means the
// consumer has not added the integration.
//
// Rules (first match wins), from DESIGN.md:
//  1. no record: available
//  2. credentials missing: added
//  3. oauth2, granted scopes known and a required one missing: invalid
//     (missing_scopes)
//  4. oauth2, tokens present, a required setting missing: authorized
//  5. latest verdict for the current revision is invalid: invalid
//  6. non-oauth2, no verdict for the current revision: added
//  7. otherwise: callable
func Derive(c *Connection, in *catalog.Integration, now time.Time) (State, Health) {
	if c == nil {
		return Available, HealthOK
	}
	oauth := in.AuthType == catalog.AuthOAuth2
	if !hasCredentials(c, in) {
		return Added, HealthNeedsAuth
	}
	if oauth && c.GrantedScopes != nil && len(in.MissingScopes(c.GrantedScopes)) > 0 {
		return Invalid, HealthMissingScopes
	}
	if missingSetting(c, in) {
		if oauth {
			return Authorized, HealthMissingSettings
		}
		return Added, HealthMissingSettings
	}
	v := c.Verdict
	current := v != nil && v.Revision == c.Revision
	if current && v.Outcome == OutcomeInvalid {
		switch v.Reason {
		case ReasonRefreshTokenRevoked:
			return Invalid, HealthRevoked
		case ReasonMisconfiguredAccount:
			return Invalid, HealthMisconfigured
		case ReasonRotationLost:
			return Invalid, HealthRotationLost
		}
		return Invalid, HealthNeedsAuth
	}
	if !oauth && !current {
		return Added, pendingHealth(c)
	}
	return Callable, callableHealth(c, in, now)
}

// hasCredentials: OAuth needs an access token or a refresh token; others
// need every required credential field.
func hasCredentials(c *Connection, in *catalog.Integration) bool {
	if in.AuthType == catalog.AuthOAuth2 {
		if c.Credentials.AccessToken == "" && c.Credentials.RefreshToken == "" {
			return false
		}
	}
	for _, f := range in.CredentialFields {
		if c.Credentials.Get(f) == "" {
			return false
		}
	}
	return true
}

func missingSetting(c *Connection, in *catalog.Integration) bool {
	for _, s := range in.Settings {
		if s.Required && c.Settings[s.Name] == "" {
			return true
		}
	}
	return false
}

// pendingHealth is the health of a connection awaiting its first verdict for
// the current credentials.
func pendingHealth(c *Connection) Health {
	if c.Confirmation.Invalids > 0 && c.Confirmation.Revision == c.Revision {
		return HealthPendingConfirmation
	}
	return transientHealth(c)
}

// transientHealth is the health a run of failed checks leaves: degraded
// for provider trouble, misconfigured for the consumer's own (the latest
// failure decides), ok without failures.
func transientHealth(c *Connection) Health {
	switch {
	case c.Transient.Failures == 0:
		return HealthOK
	case c.Transient.Misconfigured:
		return HealthMisconfigured
	}
	return HealthDegraded
}

func callableHealth(c *Connection, in *catalog.Integration, now time.Time) Health {
	if c.Confirmation.Invalids > 0 && c.Confirmation.Revision == c.Revision {
		return HealthPendingConfirmation
	}
	if in.AuthType == catalog.AuthOAuth2 && CanRefresh(c.Credentials, in) {
		if c.Refresh.Failures > 0 || TokenExpired(c.Credentials, now) {
			return HealthPendingRefresh
		}
	}
	return transientHealth(c)
}

// TokenExpired reports whether the access token is missing, expired or
// within its expiry skew of expiry (ExpirySkew, or a tenth of the token's
// lifetime if that is shorter). A token without an expiry never expires.
func TokenExpired(c Credentials, now time.Time) bool {
	if c.AccessToken == "" {
		return true
	}
	return !c.ExpiresAt.IsZero() && !now.Add(skewFor(c)).Before(c.ExpiresAt)
}
