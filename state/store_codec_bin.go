package state

import (
	"encoding/binary"
	"errors"
	"maps"
	"math"
	"slices"
)

// The field d of a record in its packed form: Redis memory per connection
// is a design goal, and the JSON form (recData, still read) spent most of
// its bytes on names, quotes and 13-digit times. Layout, every integer a
// varint (encoding/binary; "s" = signed zigzag, "u" = unsigned):
//
//	byte    dataFormatV1
//	u       flags (dataFlag*): which of the optional parts follow
//	s       CreatedAt, unix ms (0 = zero time)
//	s       Revision - CreatedAt (the first revision is the creation time)
//	s       UpdatedAt - CreatedAt
//	enum    Health
//	[settings]     u count, then key, value strings in key order
//	[metadata]     string (the raw JSON)
//	[scopes]       u count, then strings (the flag tells nil from empty)
//	[verdict]      enum Outcome, enum Reason, s HTTPStatus,
//	               s CheckedAt - UpdatedAt, s Revision - record Revision,
//	               string Lineage
//	[transient]    s Failures, string LastError, s LastAt - UpdatedAt
//	               (Misconfigured is a flag)
//	[confirmation] s Invalids, s Revision - record Revision, enum Reason,
//	               s Status, s FirstAt - UpdatedAt
//	[refresh]      s Failures, string LastError, s LastAt - UpdatedAt,
//	               s RefreshedAt - UpdatedAt
//
// A string is u length then its bytes. An enum is u code: 0 then a string,
// or k >= 1 for dataEnums[k-1] (the usual health, outcome and reason
// values, one byte each). Times are kept as differences because they lie
// close together: most fit in one to three bytes instead of six. A
// difference may wrap around int64; decoding wraps it back, so every value
// round-trips.
//
// The JSON form starts with '{'; dataFormatV1 never does.
const dataFormatV1 = 0x01

const (
	dataFlagDisabled = 1 << iota
	dataFlagSettings
	dataFlagMetadata
	dataFlagScopes
	dataFlagVerdict
	dataFlagTransient
	dataFlagMisconfigured
	dataFlagConfirmation
	dataFlagRefresh
)

// dataEnums are the strings an enum field codes in one byte. Append only:
// a code written once must mean the same string forever.
var dataEnums = []string{
	"",
	string(HealthOK), string(HealthPendingRefresh), string(HealthPendingConfirmation), string(HealthDegraded),
	string(HealthNeedsAuth), string(HealthRevoked), string(HealthMissingSettings), string(HealthMisconfigured),
	string(HealthRotationLost), string(HealthMissingScopes),
	string(OutcomeValid), string(OutcomeInvalid),
	ReasonCheckPassed, ReasonCredentialsRejected, ReasonAssertionFailed, ReasonRefreshTokenRevoked,
	ReasonMisconfiguredAccount, ReasonRotationLost,
}

var errDataTruncated = errors.New("packed data truncated or malformed")

type dataWriter struct{ b []byte }

func (w *dataWriter) u(v uint64) { w.b = binary.AppendUvarint(w.b, v) }
func (w *dataWriter) s(v int64)  { w.b = binary.AppendVarint(w.b, v) }
func (w *dataWriter) str(v string) {
	w.u(uint64(len(v)))
	w.b = append(w.b, v...)
}
func (w *dataWriter) enum(v string) {
	if i := slices.Index(dataEnums, v); i >= 0 {
		w.u(uint64(i + 1))
		return
	}
	w.u(0)
	w.str(v)
}

// encodeDataPacked is the packed form of field d (see dataFormatV1).
func encodeDataPacked(c *Connection) []byte {
	var flags uint64
	if !c.Enabled {
		flags |= dataFlagDisabled
	}
	if len(c.Settings) > 0 {
		flags |= dataFlagSettings
	}
	if len(c.Metadata) > 0 {
		flags |= dataFlagMetadata
	}
	if c.GrantedScopes != nil {
		flags |= dataFlagScopes
	}
	if c.Verdict != nil {
		flags |= dataFlagVerdict
	}
	if c.Transient != (Transient{}) {
		flags |= dataFlagTransient
		if c.Transient.Misconfigured {
			flags |= dataFlagMisconfigured
		}
	}
	if c.Confirmation != (Confirmation{}) {
		flags |= dataFlagConfirmation
	}
	if c.Refresh != (RefreshStatus{}) {
		flags |= dataFlagRefresh
	}
	ca, ua := ms(c.CreatedAt), ms(c.UpdatedAt)
	w := dataWriter{b: make([]byte, 0, 64)}
	w.b = append(w.b, dataFormatV1)
	w.u(flags)
	w.s(ca)
	w.s(c.Revision - ca)
	w.s(ua - ca)
	w.enum(string(c.Health))
	if flags&dataFlagSettings != 0 {
		w.u(uint64(len(c.Settings)))
		for _, k := range slices.Sorted(maps.Keys(c.Settings)) {
			w.str(k)
			w.str(c.Settings[k])
		}
	}
	if flags&dataFlagMetadata != 0 {
		w.str(string(c.Metadata))
	}
	if flags&dataFlagScopes != 0 {
		w.u(uint64(len(c.GrantedScopes)))
		for _, s := range c.GrantedScopes {
			w.str(s)
		}
	}
	if v := c.Verdict; v != nil {
		w.enum(string(v.Outcome))
		w.enum(v.Reason)
		w.s(int64(v.HTTPStatus))
		w.s(ms(v.CheckedAt) - ua)
		w.s(v.Revision - c.Revision)
		w.str(v.Lineage)
	}
	if flags&dataFlagTransient != 0 {
		t := c.Transient
		w.s(int64(t.Failures))
		w.str(t.LastError)
		w.s(ms(t.LastAt) - ua)
	}
	if flags&dataFlagConfirmation != 0 {
		f := c.Confirmation
		w.s(int64(f.Invalids))
		w.s(f.Revision - c.Revision)
		w.enum(f.Reason)
		w.s(int64(f.Status))
		w.s(ms(f.FirstAt) - ua)
	}
	if flags&dataFlagRefresh != 0 {
		r := c.Refresh
		w.s(int64(r.Failures))
		w.str(r.LastError)
		w.s(ms(r.LastAt) - ua)
		w.s(ms(r.RefreshedAt) - ua)
	}
	return w.b
}

type dataReader struct {
	b   []byte
	err error
}

func (r *dataReader) u() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errDataTruncated
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *dataReader) s() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = errDataTruncated
		return 0
	}
	r.b = r.b[n:]
	return v
}

// int reads a signed number that must fit an int.
func (r *dataReader) int() int {
	v := r.s()
	if v > math.MaxInt || v < math.MinInt {
		r.err = errDataTruncated
		return 0
	}
	return int(v)
}

// count reads the length of a list whose items take a byte each at least.
func (r *dataReader) count() int {
	v := r.u()
	if v > uint64(len(r.b)) {
		r.err = errDataTruncated
		return 0
	}
	return int(v)
}

func (r *dataReader) str() string {
	n := r.u()
	if r.err != nil {
		return ""
	}
	if n > uint64(len(r.b)) {
		r.err = errDataTruncated
		return ""
	}
	v := string(r.b[:n])
	r.b = r.b[n:]
	return v
}

func (r *dataReader) enum() string {
	code := r.u()
	switch {
	case r.err != nil:
		return ""
	case code == 0:
		return r.str()
	case code <= uint64(len(dataEnums)):
		return dataEnums[code-1]
	}
	r.err = errDataTruncated
	return ""
}

// decodeDataPacked reads the packed form of field d, the format byte
// included.
func decodeDataPacked(b []byte, c *Connection) error {
	if len(b) == 0 || b[0] != dataFormatV1 {
		return errors.New("unknown packed data format")
	}
	r := dataReader{b: b[1:]}
	flags := r.u()
	ca := r.s()
	rev := ca + r.s()
	ua := ca + r.s()
	c.Health = Health(r.enum())
	c.Enabled = flags&dataFlagDisabled == 0
	c.Revision = rev
	c.CreatedAt, c.UpdatedAt = fromMS(ca), fromMS(ua)
	if flags&dataFlagSettings != 0 {
		n := r.count()
		c.Settings = make(map[string]string, n)
		for range n {
			k := r.str()
			c.Settings[k] = r.str()
		}
	}
	if flags&dataFlagMetadata != 0 {
		c.Metadata = []byte(r.str())
	}
	if flags&dataFlagScopes != 0 {
		n := r.count()
		c.GrantedScopes = make([]string, n)
		for i := range n {
			c.GrantedScopes[i] = r.str()
		}
	}
	if flags&dataFlagVerdict != 0 {
		v := &Verdict{}
		v.Outcome = Outcome(r.enum())
		v.Reason = r.enum()
		v.HTTPStatus = r.int()
		v.CheckedAt = fromMS(ua + r.s())
		v.Revision = rev + r.s()
		v.Lineage = r.str()
		c.Verdict = v
	}
	if flags&dataFlagTransient != 0 {
		c.Transient = Transient{Failures: r.int(), LastError: r.str(), LastAt: fromMS(ua + r.s()),
			Misconfigured: flags&dataFlagMisconfigured != 0}
	}
	if flags&dataFlagConfirmation != 0 {
		f := Confirmation{Invalids: r.int()}
		f.Revision = rev + r.s()
		f.Reason = r.enum()
		f.Status = r.int()
		f.FirstAt = fromMS(ua + r.s())
		c.Confirmation = f
	}
	if flags&dataFlagRefresh != 0 {
		c.Refresh = RefreshStatus{Failures: r.int(), LastError: r.str(), LastAt: fromMS(ua + r.s()),
			RefreshedAt: fromMS(ua + r.s())}
	}
	switch {
	case r.err != nil:
		return r.err
	case len(r.b) != 0:
		return errors.New("packed data has trailing bytes")
	}
	return nil
}

// The plaintext of field c (the credentials, before sealing) in its packed
// form; records written before it hold JSON (recCreds, starts with '{'),
// still read. Layout:
//
//	byte    credsFormatV1
//	u       flags (credsFlag*): which of the parts follow
//	[access token] string   [refresh token] string
//	[expires]      s ExpiresAt, unix ms
//	[issued]       s IssuedAt - ExpiresAt (ExpiresAt 0 when absent)
//	[api key] string   [username] string   [password] string
//	[extra]        u count, then key, value strings in key order
//
// For an OAuth token that saves the JSON's names, quotes and 13-digit
// times: about 35 bytes per record.
const credsFormatV1 = 0x01

const (
	credsFlagAccess = 1 << iota
	credsFlagRefresh
	credsFlagExpires
	credsFlagIssued
	credsFlagAPIKey
	credsFlagUsername
	credsFlagPassword
	credsFlagExtra
)

// encodeCredsPacked is the packed plaintext of field c.
func encodeCredsPacked(c Credentials) []byte {
	var flags uint64
	set := func(ok bool, f uint64) {
		if ok {
			flags |= f
		}
	}
	ea, ia := ms(c.ExpiresAt), ms(c.IssuedAt)
	set(c.AccessToken != "", credsFlagAccess)
	set(c.RefreshToken != "", credsFlagRefresh)
	set(ea != 0, credsFlagExpires)
	set(ia != 0, credsFlagIssued)
	set(c.APIKey != "", credsFlagAPIKey)
	set(c.Username != "", credsFlagUsername)
	set(c.Password != "", credsFlagPassword)
	set(len(c.Extra) > 0, credsFlagExtra)
	w := dataWriter{b: make([]byte, 0, 16+len(c.AccessToken)+len(c.RefreshToken)+len(c.APIKey))}
	w.b = append(w.b, credsFormatV1)
	w.u(flags)
	for _, p := range []struct {
		flag uint64
		v    string
	}{{credsFlagAccess, c.AccessToken}, {credsFlagRefresh, c.RefreshToken}} {
		if flags&p.flag != 0 {
			w.str(p.v)
		}
	}
	if flags&credsFlagExpires != 0 {
		w.s(ea)
	}
	if flags&credsFlagIssued != 0 {
		w.s(ia - ea)
	}
	for _, p := range []struct {
		flag uint64
		v    string
	}{{credsFlagAPIKey, c.APIKey}, {credsFlagUsername, c.Username}, {credsFlagPassword, c.Password}} {
		if flags&p.flag != 0 {
			w.str(p.v)
		}
	}
	if flags&credsFlagExtra != 0 {
		w.u(uint64(len(c.Extra)))
		for _, k := range slices.Sorted(maps.Keys(c.Extra)) {
			w.str(k)
			w.str(c.Extra[k])
		}
	}
	return w.b
}

// decodeCredsPacked reads the packed plaintext of field c, the format
// byte included.
func decodeCredsPacked(b []byte) (Credentials, error) {
	if len(b) == 0 || b[0] != credsFormatV1 {
		return Credentials{}, errors.New("unknown packed credentials format")
	}
	r := dataReader{b: b[1:]}
	flags := r.u()
	var c Credentials
	str := func(f uint64) string {
		if flags&f == 0 {
			return ""
		}
		return r.str()
	}
	c.AccessToken = str(credsFlagAccess)
	c.RefreshToken = str(credsFlagRefresh)
	var ea int64
	if flags&credsFlagExpires != 0 {
		ea = r.s()
		c.ExpiresAt = fromMS(ea)
	}
	if flags&credsFlagIssued != 0 {
		c.IssuedAt = fromMS(ea + r.s())
	}
	c.APIKey = str(credsFlagAPIKey)
	c.Username = str(credsFlagUsername)
	c.Password = str(credsFlagPassword)
	if flags&credsFlagExtra != 0 {
		n := r.count()
		c.Extra = make(map[string]string, n)
		for range n {
			k := r.str()
			c.Extra[k] = r.str()
		}
	}
	switch {
	case r.err != nil:
		return Credentials{}, r.err
	case len(r.b) != 0:
		return Credentials{}, errors.New("packed credentials have trailing bytes")
	}
	return c, nil
}
