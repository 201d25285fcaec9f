// Package secrets encrypts credentials at rest with AES-256-GCM under a
// keyring of named keys, so keys can rotate: the first key encrypts, every
// key decrypts, and each sealed value names the key that sealed it.
package secrets

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// EnvKeys is the environment variable the keyring is read from.
const EnvKeys = "VAULTFLEET_ENCRYPTION_KEYS"

// ErrNoKeys means no encryption key is configured.
var ErrNoKeys = errors.New("secrets: no encryption key configured (set " + EnvKeys + "=id:base64key[,...])")

// ErrUnknownKey means a sealed value names a key the keyring does not hold.
var ErrUnknownKey = errors.New("secrets: sealed with an unknown key id")

// ErrCorrupt means a sealed value cannot be opened: it was truncated,
// tampered with, or sealed for another record.
var ErrCorrupt = errors.New("secrets: sealed value is corrupt or does not belong here")

// Keyring holds AES-256-GCM keys by id.
type Keyring struct {
	primary string
	aeads   map[string]cipher.AEAD
}

// Key is one named key of a key list.
type Key struct {
	ID  string
	Raw []byte
}

// ParseKeyList reads "id:base64key,id2:base64key2" where every key is
// exactly size bytes of standard or URL-safe base64, padded or not. The
// first key is the primary one. Errors start with "key N" or "key \"id\""
// and never contain key material; callers prefix their package name. An
// empty spec is an error naming no key; callers replace it with their own
// "not configured" sentinel.
func ParseKeyList(spec string, size int) ([]Key, error) {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		return nil, errors.New("no key")
	}
	var out []Key
	seen := map[string]bool{}
	for i, entry := range strings.Split(spec, ",") {
		id, b64, ok := strings.Cut(strings.TrimSpace(entry), ":")
		if !ok || id == "" || b64 == "" {
			return nil, fmt.Errorf("key %d: want id:base64key", i+1)
		}
		if len(id) > 32 || strings.ContainsAny(id, " \t|") {
			return nil, fmt.Errorf("key %d: id must be at most 32 characters without spaces or '|'", i+1)
		}
		raw, err := decodeKey(b64)
		if err != nil {
			return nil, fmt.Errorf("key %q: not base64", id)
		}
		if len(raw) != size {
			return nil, fmt.Errorf("key %q: want %d bytes, got %d", id, size, len(raw))
		}
		if seen[id] {
			return nil, fmt.Errorf("key %q listed twice", id)
		}
		seen[id] = true
		out = append(out, Key{ID: id, Raw: raw})
	}
	return out, nil
}

// ParseKeyring reads "id:base64key,id2:base64key2"; each key is 32 bytes of
// standard or URL-safe base64. Errors name the entry, never the key.
func ParseKeyring(spec string) (*Keyring, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, ErrNoKeys
	}
	keys, err := ParseKeyList(spec, 32)
	if err != nil {
		return nil, fmt.Errorf("secrets: %w (AES-256)", err)
	}
	k := &Keyring{aeads: map[string]cipher.AEAD{}, primary: keys[0].ID}
	for _, key := range keys {
		block, err := aes.NewCipher(key.Raw)
		if err != nil {
			return nil, fmt.Errorf("secrets: key %q: %v", key.ID, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("secrets: key %q: %v", key.ID, err)
		}
		k.aeads[key.ID] = aead
	}
	return k, nil
}

func decodeKey(s string) ([]byte, error) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("bad base64")
}

// NewKey returns a random key spec entry "id:base64key", for dev and tests.
func NewKey(id string) string {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return id + ":" + base64.StdEncoding.EncodeToString(b)
}

// PrimaryID is the id of the key that seals.
func (k *Keyring) PrimaryID() string { return k.primary }

// Seal encrypts plaintext under the primary key. aad binds the value to its
// record (the connection key), so a sealed value moved elsewhere won't open.
// Layout: len(id) | id | nonce | ciphertext+tag.
func (k *Keyring) Seal(plaintext, aad []byte) []byte {
	aead := k.aeads[k.primary]
	out := make([]byte, 0, 1+len(k.primary)+aead.NonceSize()+len(plaintext)+aead.Overhead())
	out = append(out, byte(len(k.primary)))
	out = append(out, k.primary...)
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		panic(err)
	}
	out = append(out, nonce...)
	return aead.Seal(out, nonce, plaintext, aad)
}

// Open decrypts a value sealed by Seal under any key of the ring.
func (k *Keyring) Open(sealed, aad []byte) ([]byte, error) {
	id, err := KeyID(sealed)
	if err != nil {
		return nil, err
	}
	aead, ok := k.aeads[id]
	if !ok {
		return nil, ErrUnknownKey
	}
	rest := sealed[1+len(id):]
	if len(rest) < aead.NonceSize()+aead.Overhead() {
		return nil, ErrCorrupt
	}
	pt, err := aead.Open(nil, rest[:aead.NonceSize()], rest[aead.NonceSize():], aad)
	if err != nil {
		return nil, ErrCorrupt
	}
	return pt, nil
}

// KeyID returns the id of the key that sealed a value, to find values that
// still need re-sealing after a rotation.
func KeyID(sealed []byte) (string, error) {
	if len(sealed) < 1 || len(sealed) < 1+int(sealed[0]) {
		return "", ErrCorrupt
	}
	return string(sealed[1 : 1+int(sealed[0])]), nil
}
