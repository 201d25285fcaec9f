package state

import "encoding/json"

// The JSON forms of fields d and c that releases before the packed codec
// wrote: the store only reads them now, the tests write them to check
// that such records still read.

// encodeDataJSON is the JSON form of field d that earlier versions wrote
// (kept to test that such records still read).
func encodeDataJSON(c *Connection) ([]byte, error) {
	d := recData{
		Disabled:  !c.Enabled,
		Revision:  c.Revision,
		Health:    c.Health,
		CreatedAt: ms(c.CreatedAt),
		UpdatedAt: ms(c.UpdatedAt),
	}
	if len(c.Settings) > 0 {
		d.Settings = c.Settings
	}
	if len(c.Metadata) > 0 {
		d.Metadata = c.Metadata
	}
	if c.GrantedScopes != nil {
		d.Scopes = &c.GrantedScopes
	}
	if v := c.Verdict; v != nil {
		d.Verdict = &recVerdict{Outcome: v.Outcome, Reason: v.Reason, HTTPStatus: v.HTTPStatus,
			CheckedAt: ms(v.CheckedAt), Revision: v.Revision, Lineage: v.Lineage}
		if v.Revision == c.Revision {
			d.Verdict.Revision = 0
		}
	}
	if t := c.Transient; t != (Transient{}) {
		d.Transient = &recFailures{Failures: t.Failures, LastError: t.LastError, LastAt: ms(t.LastAt),
			Misconfigured: t.Misconfigured}
	}
	if f := c.Confirmation; f != (Confirmation{}) {
		d.Confirmation = &recConfirmation{Invalids: f.Invalids, Revision: f.Revision, Reason: f.Reason,
			Status: f.Status, FirstAt: ms(f.FirstAt)}
	}
	if r := c.Refresh; r != (RefreshStatus{}) {
		d.Refresh = &recRefresh{recFailures: recFailures{Failures: r.Failures, LastError: r.LastError,
			LastAt: ms(r.LastAt)}, RefreshedAt: ms(r.RefreshedAt)}
	}
	return json.Marshal(d)
}

// encodeCredsJSON is the JSON plaintext of field c that earlier versions
// sealed (kept to test that such records still open).
func encodeCredsJSON(c Credentials) ([]byte, error) {
	rc := recCreds{AccessToken: c.AccessToken, RefreshToken: c.RefreshToken, ExpiresAt: ms(c.ExpiresAt),
		IssuedAt: ms(c.IssuedAt), APIKey: c.APIKey, Username: c.Username, Password: c.Password}
	if len(c.Extra) > 0 {
		rc.Extra = c.Extra
	}
	return json.Marshal(rc)
}
