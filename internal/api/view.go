package api

import (
	"strconv"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// connectionView is a connection as the API shows it. It has no field that
// could hold a credential value.
type connectionView struct {
	ID         string       `json:"id"`
	ConsumerID string       `json:"consumer_id"`
	ServiceID  string       `json:"service_id"`
	UnifiedAPI string       `json:"unified_api"`
	Name       string       `json:"name"`
	AuthType   string       `json:"auth_type"`
	State      state.State  `json:"state"`
	Health     state.Health `json:"health"`
	Enabled    bool         `json:"enabled"`
	Status     string       `json:"status"`
	// Settings are consumer settings (instance URL, tenant): not secrets.
	Settings map[string]string `json:"settings"`
	// Credentials lists the names of the credential fields that are set.
	Credentials []string `json:"credentials"`
	// Validation is absent before the first verdict.
	Validation *validationView `json:"validation,omitempty"`
	// TokenExpiresAt is present for OAuth integrations only (null when
	// unknown).
	TokenExpiresAt *optionalTime `json:"token_expires_at,omitempty"`
	CreatedAt      *time.Time    `json:"created_at"`
	UpdatedAt      *time.Time    `json:"updated_at"`
	Version        int64         `json:"version"`
	// CredentialsUnreadable is true when the stored credentials cannot be
	// opened (sealed with a key no longer configured): state and health
	// are the stored ones and credentials is empty until they are
	// replaced in full (PUT) or the connection is deleted.
	CredentialsUnreadable bool `json:"credentials_unreadable,omitempty"`
}

// optionalTime marshals a zero time as null.
type optionalTime struct{ t time.Time }

func (o optionalTime) MarshalJSON() ([]byte, error) {
	if o.t.IsZero() {
		return []byte("null"), nil
	}
	return []byte(strconv.Quote(o.t.UTC().Format(time.RFC3339Nano))), nil
}

type validationView struct {
	// Verdict is "valid" or "invalid".
	Verdict    state.Outcome `json:"verdict"`
	Reason     string        `json:"reason,omitempty"`
	HTTPStatus int           `json:"http_status,omitempty"`
	CheckedAt  time.Time     `json:"checked_at"`
	// Current is false when the verdict was computed for credentials or
	// settings that have changed since (it no longer decides the state).
	Current bool `json:"current"`
}

// view renders c (nil: not added) for integration in (nil: no longer in
// the catalog) at now. State and health are derived again at read time:
// health depends on the clock.
func view(consumerID string, c *state.Connection, in *catalog.Integration, now time.Time) connectionView {
	v := connectionView{ConsumerID: consumerID, Settings: map[string]string{}, Credentials: []string{}}
	if in != nil {
		v.ID = state.ConnectionID(in.UnifiedAPI, in.ID)
		v.ServiceID, v.UnifiedAPI, v.Name = in.ID, in.UnifiedAPI, in.Name
		v.AuthType, v.Status = string(in.AuthType), string(in.Status)
		if in.AuthType == catalog.AuthOAuth2 {
			v.TokenExpiresAt = &optionalTime{}
		}
	}
	if c == nil {
		v.State, v.Health = state.Derive(nil, in, now)
		return v
	}
	v.ID, v.ServiceID, v.UnifiedAPI = c.ID, c.ServiceID, c.UnifiedAPI
	if c.Unreadable {
		// Its credentials are unknown: deriving again would call it
		// `added`; the stored state and health are the last known.
		v.State, v.Health, v.CredentialsUnreadable = c.State, c.Health, true
		if in == nil {
			v.Name = c.ServiceID
		}
	} else if in != nil {
		v.State, v.Health = state.Derive(c, in, now)
	} else {
		v.Name, v.State, v.Health = c.ServiceID, c.State, c.Health
	}
	v.Enabled = c.Enabled
	for k, val := range c.Settings {
		if val != "" {
			v.Settings[k] = val
		}
	}
	if f := c.Credentials.Fields(); f != nil {
		v.Credentials = f
	}
	if c.Verdict != nil {
		v.Validation = &validationView{
			Verdict: c.Verdict.Outcome, Reason: c.Verdict.Reason, HTTPStatus: c.Verdict.HTTPStatus,
			CheckedAt: c.Verdict.CheckedAt.UTC().Truncate(time.Millisecond), Current: c.Verdict.Revision == c.Revision,
		}
	}
	if v.TokenExpiresAt != nil && !c.Unreadable {
		v.TokenExpiresAt.t = c.Credentials.ExpiresAt
	}
	// Milliseconds, as stored: a write's answer and a later read agree.
	created, updated := c.CreatedAt.UTC().Truncate(time.Millisecond), c.UpdatedAt.UTC().Truncate(time.Millisecond)
	v.CreatedAt, v.UpdatedAt = &created, &updated
	v.Version = c.Version
	return v
}
