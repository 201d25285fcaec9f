package session

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"
)

var t0 = time.Date(2026, 11, 30, 8, 0, 0, 0, time.UTC)

func mustKeys(t *testing.T, spec string) *Keys {
	t.Helper()
	k, err := ParseKeys(spec)
	require.NoError(t, err)
	return k
}

// reencode replaces the payload of a token, keeping header and signature.
func reencode(t *testing.T, tok string, edit func(m map[string]any)) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	require.Len(t, parts, 3)
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(raw, &m))
	edit(m)
	raw, err = json.Marshal(m)
	require.NoError(t, err)
	parts[1] = base64.RawURLEncoding.EncodeToString(raw)
	return strings.Join(parts, ".")
}

func TestVerify(t *testing.T) {
	a, b := NewKey("a"), NewKey("b")
	keys := mustKeys(t, a+","+b)
	tok, _, err := keys.Issue(Options{ConsumerID: "c1", UnifiedAPIs: []string{"crm"}, Length: time.Hour}, t0)
	require.NoError(t, err)

	// The same key material under HS384 and with alg none.
	raw := keys.keys["a"]
	hs384 := jwt.NewWithClaims(jwt.SigningMethodHS384, jwt.MapClaims{"sub": "c1", "jti": "x", "iss": issuer,
		"aud": audience, "exp": t0.Add(time.Hour).Unix()})
	hs384.Header["kid"] = "a"
	hs384Tok, err := hs384.SignedString(raw)
	require.NoError(t, err)
	none := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{"sub": "c1", "jti": "x", "iss": issuer,
		"aud": audience, "exp": t0.Add(time.Hour).Unix()})
	none.Header["kid"] = "a"
	noneTok, err := none.SignedString(jwt.UnsafeAllowNoneSignatureType)
	require.NoError(t, err)
	// A token of a foreign audience, correctly signed.
	other := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "c1", "jti": "x", "iss": issuer,
		"aud": "elsewhere", "exp": t0.Add(time.Hour).Unix()})
	other.Header["kid"] = "a"
	otherTok, err := other.SignedString(raw)
	require.NoError(t, err)
	// Signed by b, then b retired: only a remains.
	rotated := mustKeys(t, b+","+a)
	byB, _, err := rotated.Issue(Options{ConsumerID: "c1"}, t0)
	require.NoError(t, err)

	for _, tc := range []struct {
		name  string
		keys  *Keys
		token string
		at    time.Time
		want  error
	}{
		{"Valid", keys, tok, t0.Add(59 * time.Minute), nil},
		{"Expired", keys, tok, t0.Add(time.Hour + time.Second), ErrExpired},
		{"ForgedSignature", keys, tok[:len(tok)-4] + "AAAA", t0, ErrInvalid},
		{"AnotherConsumer", keys, reencode(t, tok, func(m map[string]any) { m["sub"] = "c2" }), t0, ErrInvalid},
		{"WiderAPIs", keys, reencode(t, tok, func(m map[string]any) { delete(m, "unified_apis") }), t0, ErrInvalid},
		{"AlgNone", keys, noneTok, t0, ErrInvalid},
		{"AlgHS384", keys, hs384Tok, t0, ErrInvalid},
		{"ForeignAudience", keys, otherTok, t0, ErrInvalid},
		{"RotatedKeyStillVerifies", keys, byB, t0, nil},
		{"RetiredKey", mustKeys(t, a), byB, t0, ErrInvalid},
		{"Garbage", keys, "not.a.token", t0, ErrInvalid},
		{"Empty", keys, "", t0, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.keys.Verify(tc.token, tc.at)
			if tc.want != nil {
				require.ErrorIs(t, err, tc.want)
				require.Nil(t, c)
				if tc.token != "" {
					require.NotContains(t, err.Error(), tc.token)
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, "c1", c.ConsumerID())
			require.NotEmpty(t, c.SessionID())
		})
	}
}

func TestIssueNamesPrimaryKey(t *testing.T) {
	keys := mustKeys(t, NewKey("k2")+","+NewKey("k1"))
	tok, _, err := keys.Issue(Options{ConsumerID: "c"}, t0)
	require.NoError(t, err)
	head, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	require.NoError(t, err)
	require.Contains(t, string(head), `"kid":"k2"`)
	require.Contains(t, string(head), `"alg":"HS256"`)
	c, err := keys.Verify(tok, t0)
	require.NoError(t, err)
	require.Equal(t, t0.Add(DefaultLength), c.ExpiresAt.Time.UTC())
}

func TestAllowActions(t *testing.T) {
	keys := mustKeys(t, NewKey("a"))
	for _, tc := range []struct {
		name    string
		actions []Action
		allowed []Action
		refused []Action
	}{
		{"OmittedAllowsAll", nil, Actions(), nil},
		{"EmptyAllowsNone", []Action{}, nil, Actions()},
		{"Some", []Action{ActionDisable}, []Action{ActionDisable}, []Action{ActionDelete, ActionDisconnect, ActionReauthorize}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok, _, err := keys.Issue(Options{ConsumerID: "c", AllowActions: tc.actions}, t0)
			require.NoError(t, err)
			c, err := keys.Verify(tok, t0)
			require.NoError(t, err)
			for _, a := range tc.allowed {
				require.True(t, c.Allows(a), a)
			}
			for _, a := range tc.refused {
				require.False(t, c.Allows(a), a)
			}
		})
	}
	_, _, err := keys.Issue(Options{ConsumerID: "c", AllowActions: []Action{"launch"}}, t0)
	require.ErrorContains(t, err, "launch")
}

func TestAllowsAPI(t *testing.T) {
	c := &Claims{UnifiedAPIs: []string{"crm"}}
	require.True(t, c.AllowsAPI("crm"))
	require.False(t, c.AllowsAPI("hris"))
	require.True(t, (&Claims{}).AllowsAPI("hris"))
}

func TestParseLength(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"": time.Hour, "30m": 30 * time.Minute, "1h": time.Hour, "1d": 24 * time.Hour,
		"1w": 7 * 24 * time.Hour, "7d": 7 * 24 * time.Hour, "90m": 90 * time.Minute,
	} {
		got, err := ParseLength(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	for _, bad := range []string{"2w", "8d", "169h", "0m", "30s", "-1h", "d", "xw", "1y", "abc"} {
		_, err := ParseLength(bad)
		require.Error(t, err, bad)
	}
}

func TestParseKeys(t *testing.T) {
	_, err := ParseKeys("")
	require.ErrorIs(t, err, ErrNoKeys)
	_, err = ParseKeys("a:" + base64.StdEncoding.EncodeToString([]byte("short")))
	require.ErrorContains(t, err, `key "a": want 32 bytes, got 5`)
	k := NewKey("a")
	_, err = ParseKeys(k + "," + k)
	require.ErrorContains(t, err, "listed twice")
	require.NotContains(t, err.Error(), strings.TrimPrefix(k, "a:"))
}

func TestMAC(t *testing.T) {
	a, b := NewKey("a"), NewKey("b")
	keys := mustKeys(t, a+","+b)
	m := keys.MAC("csrf", "s1")
	require.True(t, keys.VerifyMAC("csrf", "s1", m))
	require.False(t, keys.VerifyMAC("csrf", "s2", m), "bound to the session")
	require.False(t, keys.VerifyMAC("other", "s1", m), "bound to the purpose")
	require.False(t, keys.VerifyMAC("csrf", "s1", m[:len(m)-2]+"xx"))
	require.True(t, mustKeys(t, b+","+a).VerifyMAC("csrf", "s1", m), "rotation keeps old MACs")
	require.False(t, mustKeys(t, b).VerifyMAC("csrf", "s1", m), "a retired key's MACs fail")
	err := (&Claims{AllowActions: []Action{}}).Require(ActionDelete)
	require.EqualError(t, err, `session: action "delete" is not allowed by this session's allow_actions`)
}
