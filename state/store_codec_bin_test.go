package state

import (
	"context"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"
)

// codecCases cover every part of field d.
func codecCases() map[string]*Connection {
	at := storeT0.Add(1234 * time.Millisecond)
	return map[string]*Connection{
		"Empty":     {Enabled: true, Revision: 7, Health: HealthNeedsAuth, CreatedAt: at, UpdatedAt: at},
		"ZeroTimes": {Enabled: true, Revision: 1},
		"Full": {Enabled: false, Revision: 9, Health: HealthDegraded, CreatedAt: storeT0, UpdatedAt: at,
			Settings:      map[string]string{"tenant_id": "t", "label": "x", "": "empty key", "e": ""},
			Metadata:      json.RawMessage(`{"a":[1,2,{"b":null}],"c":"\u00e9"}`),
			GrantedScopes: []string{"read", "write", ""},
			Verdict: &Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401, CheckedAt: at,
				Revision: 8, Lineage: "lin-1"},
			Transient:    Transient{Failures: 3, LastError: "503", LastAt: at, Misconfigured: true},
			Confirmation: Confirmation{Invalids: 1, Revision: 9, Reason: "r", Status: 403, FirstAt: at},
			Refresh:      RefreshStatus{Failures: 2, LastError: "timeout", LastAt: at, RefreshedAt: storeT0}},
		"CurrentVerdict": {Enabled: true, Revision: 9, Health: HealthOK, CreatedAt: at, UpdatedAt: at,
			Verdict: &Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, CheckedAt: at, Revision: 9}},
		"VerdictOfOlderRevision": {Enabled: true, Revision: storeT0.UnixMilli() + 5, Health: HealthOK, CreatedAt: storeT0,
			UpdatedAt: at, Verdict: &Verdict{Outcome: OutcomeValid, Reason: "custom_reason", HTTPStatus: 204,
				CheckedAt: storeT0, Revision: storeT0.UnixMilli() + 2}},
		"ScopesEmpty":      {Enabled: true, Revision: 3, GrantedScopes: []string{}, Health: "a-health-not-in-the-table"},
		"TransientMisconf": {Enabled: true, Revision: 3, Transient: Transient{Misconfigured: true}},
		"RefreshOnly":      {Enabled: true, Revision: 3, UpdatedAt: at, Refresh: RefreshStatus{RefreshedAt: at}},
		"ConfirmationZeroRevision": {Enabled: true, Revision: 3, UpdatedAt: at,
			Confirmation: Confirmation{Invalids: 2, Reason: ReasonRefreshTokenRevoked, FirstAt: storeT0}},
		"Extremes": {Enabled: true, Revision: math.MaxInt64, CreatedAt: time.UnixMilli(math.MinInt64 / 2).UTC(),
			UpdatedAt: time.UnixMilli(math.MaxInt64 / 2).UTC(),
			Verdict:   &Verdict{Outcome: "", HTTPStatus: -1, Revision: math.MinInt64, CheckedAt: time.UnixMilli(1).UTC()},
			Transient: Transient{Failures: math.MaxInt64, LastError: string(make([]byte, 300))}},
	}
}

func TestRecordCodecPacked(t *testing.T) {
	t.Parallel()
	for name, c := range codecCases() {
		t.Run(name, func(t *testing.T) {
			b, err := encodeData(c)
			require.NoError(t, err)
			require.Equal(t, byte(dataFormatV1), b[0])
			var got Connection
			require.NoError(t, decodeData(b, &got))
			require.Equal(t, c, &got)
			// Every strict prefix is refused, never misread.
			for i := range len(b) {
				require.Error(t, decodeData(b[:i], &Connection{}), "prefix of %d bytes", i)
			}
			require.Error(t, decodeData(append(b[:len(b):len(b)], 0), &Connection{}), "trailing byte")
		})
	}
}

// TestRecordCodecReadsJSON: records written by earlier versions hold field
// d as JSON; they still read, and to the same connection as the packed
// form of it.
func TestRecordCodecReadsJSON(t *testing.T) {
	t.Parallel()
	for name, c := range codecCases() {
		t.Run(name, func(t *testing.T) {
			j, err := encodeDataJSON(c)
			require.NoError(t, err)
			require.Equal(t, byte('{'), j[0])
			var fromJSON Connection
			require.NoError(t, decodeData(j, &fromJSON))
			if c.Metadata != nil {
				// The JSON form compacted the metadata.
				fromJSON.Metadata = c.Metadata
			}
			require.Equal(t, c, &fromJSON)
		})
	}
	// A field d as written by the release before the packed form (the
	// bench's OAuth connection, marked valid).
	old := `{"s":{"instance_url":"https://acme.my.salesforce.com"},"vd":{"o":"valid","r":"check_passed","hs":200,"t":1795780800000},"rv":1795780800000,"h":"ok","ca":1795780800000,"ua":1795780800000}`
	var got Connection
	require.NoError(t, decodeData([]byte(old), &got))
	at := time.UnixMilli(1795780800000).UTC()
	want := Connection{Enabled: true, Revision: 1795780800000, Health: HealthOK, CreatedAt: at, UpdatedAt: at,
		Settings: map[string]string{"instance_url": "https://acme.my.salesforce.com"},
		Verdict:  &Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200, CheckedAt: at, Revision: 1795780800000}}
	require.Equal(t, want, got)
	packed, err := encodeData(&got)
	require.NoError(t, err)
	t.Logf("field d: JSON %d bytes, packed %d bytes", len(old), len(packed))
	require.Less(t, len(packed), len(old)/2)
}

func TestRecordCodecPackedProperty(t *testing.T) {
	t.Parallel()
	str := rapid.OneOf(rapid.SampledFrom(dataEnums), rapid.String())
	tm := rapid.Custom(func(t *rapid.T) time.Time {
		if rapid.Bool().Draw(t, "zero") {
			return time.Time{}
		}
		v := rapid.Int64().Draw(t, "ms")
		if v == 0 {
			return time.Time{}
		}
		return time.UnixMilli(v).UTC()
	})
	rapid.Check(t, func(t *rapid.T) {
		c := &Connection{
			Enabled:   rapid.Bool().Draw(t, "enabled"),
			Revision:  rapid.Int64().Draw(t, "revision"),
			Health:    Health(str.Draw(t, "health")),
			CreatedAt: tm.Draw(t, "ca"),
			UpdatedAt: tm.Draw(t, "ua"),
		}
		if s := rapid.MapOf(rapid.String(), rapid.String()).Draw(t, "settings"); len(s) > 0 {
			c.Settings = s
		}
		if m := rapid.SliceOf(rapid.Byte()).Draw(t, "metadata"); len(m) > 0 {
			c.Metadata = m
		}
		if rapid.Bool().Draw(t, "scopes") {
			c.GrantedScopes = rapid.SliceOf(rapid.String()).Draw(t, "scope list")
			if c.GrantedScopes == nil {
				c.GrantedScopes = []string{}
			}
		}
		if rapid.Bool().Draw(t, "verdict") {
			c.Verdict = &Verdict{Outcome: Outcome(str.Draw(t, "outcome")), Reason: str.Draw(t, "reason"),
				HTTPStatus: rapid.Int().Draw(t, "status"), CheckedAt: tm.Draw(t, "checked"),
				Revision: rapid.OneOf(rapid.Just(c.Revision), rapid.Int64()).Draw(t, "vrev"), Lineage: rapid.String().Draw(t, "lineage")}
		}
		if rapid.Bool().Draw(t, "transient") {
			c.Transient = Transient{Failures: rapid.Int().Draw(t, "tf"), LastError: rapid.String().Draw(t, "te"),
				LastAt: tm.Draw(t, "tt"), Misconfigured: rapid.Bool().Draw(t, "tm")}
		}
		if rapid.Bool().Draw(t, "confirmation") {
			c.Confirmation = Confirmation{Invalids: rapid.Int().Draw(t, "ci"), Revision: rapid.Int64().Draw(t, "crev"),
				Reason: str.Draw(t, "cr"), Status: rapid.Int().Draw(t, "cs"), FirstAt: tm.Draw(t, "ct")}
		}
		if rapid.Bool().Draw(t, "refresh") {
			c.Refresh = RefreshStatus{Failures: rapid.Int().Draw(t, "rf"), LastError: rapid.String().Draw(t, "re"),
				LastAt: tm.Draw(t, "rt"), RefreshedAt: tm.Draw(t, "rr")}
		}
		b, err := encodeData(c)
		require.NoError(t, err)
		var got Connection
		require.NoError(t, decodeData(b, &got))
		require.Equal(t, c, &got)
	})
}

// TestStoreReadsJSONRecord: a record whose field d an earlier version
// wrote as JSON reads, and the next write packs it.
func TestStoreReadsJSONRecord(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	ch, err = b.store.ApplyVerdict(ctx, refSF, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	key := b.store.keysOf(refSF).record(refSF.String())
	packed, err := b.rdb.HGet(ctx, key, fieldData).Bytes()
	require.NoError(t, err)
	require.Equal(t, byte(dataFormatV1), packed[0])
	j, err := encodeDataJSON(ch.After)
	require.NoError(t, err)
	require.NoError(t, b.rdb.HSet(ctx, key, fieldData, j).Err())
	got, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, ch.After, got)
	b.clock.Advance(time.Minute)
	_, err = b.store.Patch(ctx, refSF, Input{Settings: map[string]string{"instance_url": "https://b.my.salesforce.com"}}, 0)
	require.NoError(t, err)
	d, err := b.rdb.HGet(ctx, key, fieldData).Bytes()
	require.NoError(t, err)
	require.Equal(t, byte(dataFormatV1), d[0])
}

func credsCases() map[string]Credentials {
	at := storeT0.Add(1234 * time.Millisecond)
	return map[string]Credentials{
		"Empty":        {},
		"OAuth":        {AccessToken: "00D" + strings.Repeat("a", 197), RefreshToken: "5Aep" + strings.Repeat("r", 96), ExpiresAt: at.Add(time.Hour), IssuedAt: at},
		"IssuedOnly":   {AccessToken: "a", IssuedAt: at},
		"ExpiresOnly":  {AccessToken: "a", ExpiresAt: at},
		"APIKey":       {APIKey: "k"},
		"Basic":        {Username: "u", Password: "p:\x00\"{"},
		"Extra":        {APIKey: "k", Extra: map[string]string{"client_code": "x", "": "", "tenant": "t"}},
		"Everything":   {AccessToken: "a", RefreshToken: "r", ExpiresAt: at, IssuedAt: storeT0, APIKey: "k", Username: "u", Password: "p", Extra: map[string]string{"x": "y"}},
		"FarTimes":     {AccessToken: "a", ExpiresAt: time.UnixMilli(math.MinInt64 / 3).UTC(), IssuedAt: time.UnixMilli(math.MaxInt64 / 3).UTC()},
		"IssuedBefore": {RefreshToken: "r", ExpiresAt: time.UnixMilli(1).UTC(), IssuedAt: time.UnixMilli(-1).UTC()},
	}
}

func TestCredsCodecPacked(t *testing.T) {
	t.Parallel()
	for name, c := range credsCases() {
		t.Run(name, func(t *testing.T) {
			b, err := encodeCreds(c)
			require.NoError(t, err)
			require.Equal(t, byte(credsFormatV1), b[0])
			got, err := decodeCreds(b)
			require.NoError(t, err)
			require.Equal(t, c, got)
			for i := range len(b) {
				_, err := decodeCreds(b[:i])
				require.Error(t, err, "prefix of %d bytes", i)
			}
			_, err = decodeCreds(append(b[:len(b):len(b)], 0))
			require.Error(t, err, "trailing byte")
			// Earlier versions sealed JSON: it still reads, to the same.
			j, err := encodeCredsJSON(c)
			require.NoError(t, err)
			got, err = decodeCreds(j)
			require.NoError(t, err)
			require.Equal(t, c, got)
		})
	}
	// The plaintext of the bench's OAuth connection, before and after.
	oauth := credsCases()["OAuth"]
	j, _ := encodeCredsJSON(oauth)
	p, _ := encodeCreds(oauth)
	t.Logf("credentials plaintext: JSON %d bytes, packed %d bytes", len(j), len(p))
	require.LessOrEqual(t, len(p), len(j)-30)
}

func TestCredsCodecPackedProperty(t *testing.T) {
	t.Parallel()
	tm := rapid.Custom(func(t *rapid.T) time.Time {
		if v := rapid.Int64().Draw(t, "ms"); v != 0 && rapid.Bool().Draw(t, "set") {
			return time.UnixMilli(v).UTC()
		}
		return time.Time{}
	})
	rapid.Check(t, func(t *rapid.T) {
		c := Credentials{AccessToken: rapid.String().Draw(t, "a"), RefreshToken: rapid.String().Draw(t, "r"),
			ExpiresAt: tm.Draw(t, "e"), IssuedAt: tm.Draw(t, "i"), APIKey: rapid.String().Draw(t, "k"),
			Username: rapid.String().Draw(t, "u"), Password: rapid.String().Draw(t, "p")}
		if x := rapid.MapOf(rapid.String(), rapid.String()).Draw(t, "x"); len(x) > 0 {
			c.Extra = x
		}
		b, err := encodeCreds(c)
		require.NoError(t, err)
		got, err := decodeCreds(b)
		require.NoError(t, err)
		require.Equal(t, c, got)
	})
}

// TestStoreOpensJSONCredentials: a record whose credentials an earlier
// version sealed as JSON opens; the next change of credentials seals the
// packed form.
func TestStoreOpensJSONCredentials(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	key := b.store.keysOf(refSF).record(refSF.String())
	j, err := encodeCredsJSON(ch.After.Credentials)
	require.NoError(t, err)
	require.NoError(t, b.rdb.HSet(ctx, key, fieldCreds, b.keys.Seal(j, []byte(key))).Err())
	got, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, ch.After.Credentials, got.Credentials)
	_, err = b.store.Patch(ctx, refSF, Input{Credentials: map[string]string{"access_token": "at2"}}, 0)
	require.NoError(t, err)
	sealed, err := b.rdb.HGet(ctx, key, fieldCreds).Bytes()
	require.NoError(t, err)
	pt, err := b.keys.Open(sealed, []byte(key))
	require.NoError(t, err)
	require.Equal(t, byte(credsFormatV1), pt[0])
}
