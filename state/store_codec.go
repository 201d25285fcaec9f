package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// The record is kept compact (memory per connection is a design goal):
// times as unix milliseconds, zero values omitted, and nothing that the
// key already says (consumer id, connection id, unified API) or that has a
// field of its own (version, state, service id). Field d is written packed
// (store_codec_bin.go); records written before that hold it as JSON
// (recData), which is still read.

// recData is the JSON form of field d, the non-secret facts, written by
// earlier versions and still read.
type recData struct {
	Disabled     bool              `json:"x,omitempty"`
	Settings     map[string]string `json:"s,omitempty"`
	Metadata     json.RawMessage   `json:"md,omitempty"`
	Verdict      *recVerdict       `json:"vd,omitempty"`
	Transient    *recFailures      `json:"tr,omitempty"`
	Confirmation *recConfirmation  `json:"cf,omitempty"`
	Refresh      *recRefresh       `json:"rf,omitempty"`
	Scopes       *[]string         `json:"sc,omitempty"`
	Revision     int64             `json:"rv"`
	Health       Health            `json:"h,omitempty"`
	CreatedAt    int64             `json:"ca,omitempty"`
	UpdatedAt    int64             `json:"ua,omitempty"`
}

type recVerdict struct {
	Outcome    Outcome `json:"o"`
	Reason     string  `json:"r,omitempty"`
	HTTPStatus int     `json:"hs,omitempty"`
	CheckedAt  int64   `json:"t,omitempty"`
	// Revision is left out when it is the record's (the usual case);
	// revisions are never zero.
	Revision int64  `json:"rv,omitempty"`
	Lineage  string `json:"l,omitempty"`
}

type recFailures struct {
	Failures  int    `json:"n,omitempty"`
	LastError string `json:"e,omitempty"`
	LastAt    int64  `json:"t,omitempty"`
	// Misconfigured: Transient.Misconfigured (unused by Refresh).
	Misconfigured bool `json:"m,omitempty"`
}

type recConfirmation struct {
	Invalids int    `json:"n,omitempty"`
	Revision int64  `json:"rv,omitempty"`
	Reason   string `json:"r,omitempty"`
	Status   int    `json:"hs,omitempty"`
	FirstAt  int64  `json:"t,omitempty"`
}

type recRefresh struct {
	recFailures
	RefreshedAt int64 `json:"ra,omitempty"`
}

// recCreds is the JSON plaintext of field c that earlier versions sealed,
// still read (the packed form is in store_codec_bin.go).
type recCreds struct {
	AccessToken  string            `json:"a,omitempty"`
	RefreshToken string            `json:"r,omitempty"`
	ExpiresAt    int64             `json:"e,omitempty"`
	IssuedAt     int64             `json:"i,omitempty"`
	APIKey       string            `json:"k,omitempty"`
	Username     string            `json:"u,omitempty"`
	Password     string            `json:"p,omitempty"`
	Extra        map[string]string `json:"x,omitempty"`
}

// ms is a time as unix milliseconds, 0 for the zero time.
func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// fromMS is the inverse of ms, in UTC.
func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v).UTC()
}

// encodeData is the field d of a record: the packed form.
func encodeData(c *Connection) ([]byte, error) { return encodeDataPacked(c), nil }

// decodeData reads field d in either form: JSON (from earlier versions,
// always an object, so it starts with '{') or packed.
func decodeData(b []byte, c *Connection) error {
	if len(b) == 0 || b[0] != '{' {
		return decodeDataPacked(b, c)
	}
	var d recData
	if err := json.Unmarshal(b, &d); err != nil {
		return err
	}
	c.Enabled = !d.Disabled
	c.Settings = d.Settings
	c.Metadata = d.Metadata
	if d.Scopes != nil {
		c.GrantedScopes = append([]string{}, *d.Scopes...)
	}
	c.Revision = d.Revision
	c.Health = d.Health
	c.CreatedAt = fromMS(d.CreatedAt)
	c.UpdatedAt = fromMS(d.UpdatedAt)
	if v := d.Verdict; v != nil {
		c.Verdict = &Verdict{Outcome: v.Outcome, Reason: v.Reason, HTTPStatus: v.HTTPStatus,
			CheckedAt: fromMS(v.CheckedAt), Revision: v.Revision, Lineage: v.Lineage}
		if v.Revision == 0 {
			c.Verdict.Revision = d.Revision
		}
	}
	if t := d.Transient; t != nil {
		c.Transient = Transient{Failures: t.Failures, LastError: t.LastError, LastAt: fromMS(t.LastAt),
			Misconfigured: t.Misconfigured}
	}
	if f := d.Confirmation; f != nil {
		c.Confirmation = Confirmation{Invalids: f.Invalids, Revision: f.Revision, Reason: f.Reason,
			Status: f.Status, FirstAt: fromMS(f.FirstAt)}
	}
	if r := d.Refresh; r != nil {
		c.Refresh = RefreshStatus{Failures: r.Failures, LastError: r.LastError, LastAt: fromMS(r.LastAt),
			RefreshedAt: fromMS(r.RefreshedAt)}
	}
	return nil
}

// hasAny reports whether any credential is set.
func (c Credentials) hasAny() bool { return !c.Equal(Credentials{}) }

// encodeCreds is the plaintext of field c: the packed form.
func encodeCreds(c Credentials) ([]byte, error) { return encodeCredsPacked(c), nil }

// decodeCreds reads the plaintext of field c in either form: JSON (from
// earlier versions, an object) or packed.
func decodeCreds(b []byte) (Credentials, error) {
	if len(b) == 0 || b[0] != '{' {
		return decodeCredsPacked(b)
	}
	var rc recCreds
	if err := json.Unmarshal(b, &rc); err != nil {
		return Credentials{}, err
	}
	return Credentials{AccessToken: rc.AccessToken, RefreshToken: rc.RefreshToken, ExpiresAt: fromMS(rc.ExpiresAt),
		IssuedAt: fromMS(rc.IssuedAt), APIKey: rc.APIKey, Username: rc.Username, Password: rc.Password,
		Extra: rc.Extra}, nil
}

// ErrUnreadable means a record's credentials cannot be opened: the key
// that sealed them is no longer in the keyring, or the value is corrupt or
// was copied from another record. It is never transient: retrying cannot
// help until the key is back or the credentials are replaced in full (PUT
// with new credentials) or the record is deleted. The error (an
// *UnreadableError) names the connection and the key id, never a secret.
var ErrUnreadable = errors.New("state: credentials cannot be opened")

// ErrDecrypt is the former name of ErrUnreadable.
var ErrDecrypt = ErrUnreadable

// UnreadableError is the error of a read whose credentials cannot be
// opened. Connection holds the record's non-secret facts (Unreadable set,
// Credentials empty, State and Health as stored), so a caller can still
// show it.
type UnreadableError struct {
	Ref Ref
	// KeyID names the key that sealed the value ("" if the value is too
	// damaged to say).
	KeyID string
	// Cause is secrets.ErrUnknownKey, secrets.ErrCorrupt or a note that
	// the plaintext is malformed.
	Cause error
	// Connection is the record without its credentials.
	Connection *Connection
}

func (e *UnreadableError) Error() string {
	why := "the sealed value is corrupt or belongs to another record"
	switch {
	case errors.Is(e.Cause, secrets.ErrUnknownKey):
		why = fmt.Sprintf("sealed with key id %q, which is not in the keyring (%s)", e.KeyID, secrets.EnvKeys)
	case e.Cause != nil && !errors.Is(e.Cause, secrets.ErrCorrupt):
		why = e.Cause.Error()
	}
	return fmt.Sprintf("%v: connection %s: %s", ErrUnreadable, e.Ref, why)
}

// Unwrap makes errors.Is see ErrUnreadable and the cause.
func (e *UnreadableError) Unwrap() []error { return []error{ErrUnreadable, e.Cause} }

var errMalformedPlaintext = errors.New("credentials decrypt to malformed data")

// sealCreds encrypts credentials for the record key.
func sealCreds(k *secrets.Keyring, recordKey string, c Credentials) ([]byte, error) {
	pt, err := encodeCreds(c)
	if err != nil {
		return nil, err
	}
	return k.Seal(pt, []byte(recordKey)), nil
}

// openCreds decrypts the credentials of a record. The error is the cause
// for an UnreadableError.
func openCreds(k *secrets.Keyring, recordKey string, sealed []byte) (Credentials, error) {
	pt, err := k.Open(sealed, []byte(recordKey))
	if err != nil {
		return Credentials{}, err
	}
	c, err := decodeCreds(pt)
	if err != nil {
		return Credentials{}, errMalformedPlaintext
	}
	return c, nil
}

// decodeRecord builds a connection from the fields of its record.
// sealed == nil means no credentials. When the credentials cannot be
// opened it returns the connection marked Unreadable together with an
// *UnreadableError that holds it too.
func (s *Store) decodeRecord(ref Ref, recordKey, version, st, svc string, data, sealed []byte) (*Connection, error) {
	c := &Connection{ID: ref.ConnectionID, ConsumerID: ref.ConsumerID, ServiceID: svc, State: State(st)}
	c.UnifiedAPI, _, _ = SplitConnectionID(ref.ConnectionID)
	v, err := strconv.ParseInt(version, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("state: connection %s: malformed record version", ref)
	}
	c.Version = v
	if err := decodeData(data, c); err != nil {
		return nil, fmt.Errorf("state: connection %s: malformed record: %v", ref, err)
	}
	if len(sealed) > 0 {
		c.CredentialsKeyID, _ = secrets.KeyID(sealed)
		if c.Credentials, err = openCreds(s.cfg.Keys, recordKey, sealed); err != nil {
			c.Unreadable = true
			return c, &UnreadableError{Ref: ref, KeyID: c.CredentialsKeyID, Cause: err, Connection: c}
		}
	}
	return c, nil
}

// clone returns a deep copy of c.
func (c *Connection) clone() *Connection {
	if c == nil {
		return nil
	}
	n := *c
	n.Settings = maps.Clone(c.Settings)
	n.Metadata = slices.Clone(c.Metadata)
	n.GrantedScopes = slices.Clone(c.GrantedScopes)
	n.Credentials.Extra = maps.Clone(c.Credentials.Extra)
	if c.Verdict != nil {
		v := *c.Verdict
		n.Verdict = &v
	}
	return &n
}
