package secrets

import (
	"encoding/base64"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// One parser reads both keyrings (encryption and session signing): errors
// name the entry, never the key, and the first key is the primary one.
func TestParseKeyList(t *testing.T) {
	k1, k2 := NewKey("a"), NewKey("b")
	list, err := ParseKeyList(k1+" , "+k2, 32)
	require.NoError(t, err)
	require.Equal(t, "a", list[0].ID)
	require.Len(t, list[1].Raw, 32)

	short := "c:" + base64.RawURLEncoding.EncodeToString([]byte("short"))
	for spec, want := range map[string]string{
		"":                "no key",
		"nocolon":         "key 1: want id:base64key",
		k1 + "," + short:  `key "c": want 32 bytes, got 5`,
		k1 + "," + k1:     `key "a" listed twice`,
		"x y:" + k1[2:]:   "key 1: id must be",
		"d:!!notbase64!!": `key "d": not base64`,
	} {
		_, err := ParseKeyList(spec, 32)
		require.ErrorContains(t, err, want, spec)
		require.NotContains(t, err.Error(), strings.TrimPrefix(k1, "a:"))
	}
	ring, err := ParseKeyring(k2 + "," + k1)
	require.NoError(t, err)
	require.Equal(t, "b", ring.PrimaryID())
	_, err = ParseKeyring(short)
	require.ErrorContains(t, err, `secrets: key "c": want 32 bytes, got 5 (AES-256)`)
	_, err = ParseKeyring("  ")
	require.ErrorIs(t, err, ErrNoKeys)
}
