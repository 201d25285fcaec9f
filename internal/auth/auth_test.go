package auth

import (
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/require"
)

const (
	tokA = "token-aaaaaaaaaaaaaaaa"
	tokB = "token-bbbbbbbbbbbbbbbb"
)

func TestParseTokens(t *testing.T) {
	t.Parallel()
	_, err := ParseTokens("")
	require.ErrorIs(t, err, ErrNoTokens)
	_, err = ParseTokens(" , ")
	require.ErrorIs(t, err, ErrNoTokens)
	_, err = ParseTokens(tokA + ",short-secret")
	require.ErrorContains(t, err, "token 2 is shorter")
	require.NotContains(t, err.Error(), "short-secret", "errors never echo a token")
	toks, err := ParseTokens(tokA + ", " + tokB)
	require.NoError(t, err)
	require.True(t, toks.Valid(tokA))
	require.True(t, toks.Valid(tokB))
	require.Equal(t, 2, toks.Len())
	require.False(t, toks.Valid(tokA+"x"))
	require.False(t, toks.Valid(""))
	var none *Tokens
	require.False(t, none.Valid(tokA))
	require.Zero(t, none.Len())
}

func TestRequestChecks(t *testing.T) {
	t.Parallel()
	toks, err := ParseTokens(tokA)
	require.NoError(t, err)
	tests := []struct {
		desc        string
		header      string
		user, pass  string
		wantBearer  bool
		wantBrowser bool
	}{
		{desc: "Bearer", header: "Bearer " + tokA, wantBearer: true, wantBrowser: true},
		{desc: "BearerLowerCase", header: "bearer " + tokA, wantBearer: true, wantBrowser: true},
		{desc: "WrongBearer", header: "Bearer " + tokB},
		{desc: "NoHeader"},
		{desc: "BasicWithToken", user: "ops", pass: tokA, wantBrowser: true},
		{desc: "BasicWrongPassword", user: tokA, pass: "nope"},
		{desc: "TokenAloneIsNotAScheme", header: tokA},
	}
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/v1/connections", nil)
			if tc.header != "" {
				r.Header.Set("Authorization", tc.header)
			}
			if tc.user != "" || tc.pass != "" {
				r.SetBasicAuth(tc.user, tc.pass)
			}
			require.Equal(t, tc.wantBearer, toks.Bearer(r))
			require.Equal(t, tc.wantBrowser, toks.Browser(r))
		})
	}
}
