// Package session issues and verifies Vault session tokens: signed JWTs
// (HS256, github.com/golang-jwt/jwt/v5) that let one consumer manage its
// own connections from the Vault page, within the unified APIs and the
// actions the session allows.
//
// Signing keys rotate like the encryption keys: VAULTFLEET_SESSION_KEYS is
// "id:base64key,..."; the first key signs, every key verifies, and each
// token names its key in the "kid" header. A token signed by a key that was
// removed from the list (retired) no longer verifies.
package session

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// EnvKeys is the environment variable the signing keys are read from.
const EnvKeys = "VAULTFLEET_SESSION_KEYS"

// KeySize is the size of a signing key (HS256 wants at least 32 bytes).
const KeySize = 32

// Session lengths.
const (
	// DefaultLength is a session's length when none is asked for.
	DefaultLength = time.Hour
	// MaxLength is the longest session (a week, as at Apideck).
	MaxLength = 7 * 24 * time.Hour
	// MinLength is the shortest session.
	MinLength = time.Minute
)

// Token audience and issuer: a session token is good for the Vault page
// and the consumer's /vault/connections routes, nothing else.
const (
	issuer   = "vaultfleet"
	audience = "vaultfleet-vault"
)

// Action is something a consumer may do to a connection, Apideck's
// allow_actions values.
type Action string

// Actions.
const (
	// ActionDelete allows deleting a connection.
	ActionDelete Action = "delete"
	// ActionDisconnect allows clearing credentials (and revoking them at
	// the provider where the catalog has a revoke URL).
	ActionDisconnect Action = "disconnect"
	// ActionReauthorize allows writing credentials and the OAuth flow.
	ActionReauthorize Action = "reauthorize"
	// ActionDisable allows disabling a connection.
	ActionDisable Action = "disable"
)

// Actions returns every action (a fresh slice).
func Actions() []Action {
	return []Action{ActionDelete, ActionDisconnect, ActionReauthorize, ActionDisable}
}

// Errors of Verify.
var (
	// ErrNoKeys means no signing key is configured.
	ErrNoKeys = errors.New("session: no signing key configured (set " + EnvKeys + "=id:base64key[,...])")
	// ErrExpired means the token was valid but its session is over.
	ErrExpired = errors.New("session: session expired")
	// ErrInvalid means the token is malformed, forged, signed with another
	// algorithm or by a key not configured (e.g. retired).
	ErrInvalid = errors.New("session: invalid session token")
)

// Claims are what a session token says.
type Claims struct {
	// UnifiedAPIs the session may see; empty means all.
	UnifiedAPIs []string `json:"unified_apis,omitempty"`
	// AllowActions: nil (omitted) allows every action, as at Apideck; an
	// empty list allows none.
	AllowActions []Action `json:"allow_actions"`
	// RedirectURI is where the connect flow sends the consumer back.
	RedirectURI string `json:"redirect_uri,omitempty"`
	// Subject is the consumer id, ID the session id, ExpiresAt the end.
	jwt.RegisteredClaims
}

// ConsumerID is the consumer the session belongs to.
func (c *Claims) ConsumerID() string { return c.Subject }

// SessionID identifies the session.
func (c *Claims) SessionID() string { return c.ID }

// Allows reports whether the session allows action a.
func (c *Claims) Allows(a Action) bool {
	return c.AllowActions == nil || slices.Contains(c.AllowActions, a)
}

// AllowsAPI reports whether the session covers unified API api.
func (c *Claims) AllowsAPI(api string) bool {
	return len(c.UnifiedAPIs) == 0 || slices.Contains(c.UnifiedAPIs, api)
}

// Keys are the signing keys.
type Keys struct {
	primary string
	keys    map[string][]byte
}

// ParseKeys reads "id:base64key,..." (KeySize bytes each). Errors name the
// entry, never the key.
func ParseKeys(spec string) (*Keys, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, ErrNoKeys
	}
	list, err := secrets.ParseKeyList(spec, KeySize)
	if err != nil {
		return nil, fmt.Errorf("session: %s: %w", EnvKeys, err)
	}
	k := &Keys{primary: list[0].ID, keys: map[string][]byte{}}
	for _, e := range list {
		k.keys[e.ID] = e.Raw
	}
	return k, nil
}

// NewKey returns a random key entry "id:base64key", for dev and tests.
func NewKey(id string) string {
	b := make([]byte, KeySize)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return id + ":" + base64.StdEncoding.EncodeToString(b)
}

// Options describe a new session.
type Options struct {
	ConsumerID   string
	UnifiedAPIs  []string
	AllowActions []Action
	RedirectURI  string
	// Length of the session; zero means DefaultLength.
	Length time.Duration
}

// Issue signs a new session token starting at now.
func (k *Keys) Issue(o Options, now time.Time) (string, *Claims, error) {
	if o.ConsumerID == "" {
		return "", nil, errors.New("session: consumer id is required")
	}
	if o.Length == 0 {
		o.Length = DefaultLength
	}
	if o.Length < MinLength || o.Length > MaxLength {
		return "", nil, fmt.Errorf("session: length must be between %s and %s", MinLength, MaxLength)
	}
	for _, a := range o.AllowActions {
		if !slices.Contains(Actions(), a) {
			return "", nil, fmt.Errorf("session: unknown action %q", a)
		}
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", nil, err
	}
	c := &Claims{
		UnifiedAPIs:  o.UnifiedAPIs,
		AllowActions: o.AllowActions,
		RedirectURI:  o.RedirectURI,
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    issuer,
			Audience:  jwt.ClaimStrings{audience},
			Subject:   o.ConsumerID,
			ID:        hex.EncodeToString(id),
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(o.Length)),
		},
	}
	t := jwt.NewWithClaims(jwt.SigningMethodHS256, c)
	t.Header["kid"] = k.primary
	s, err := t.SignedString(k.keys[k.primary])
	if err != nil {
		return "", nil, fmt.Errorf("session: sign: %w", err)
	}
	return s, c, nil
}

// Verify checks a token's signature (HS256 only, by the key its kid names),
// issuer, audience and expiry at now, and returns its claims. It returns
// ErrExpired or ErrInvalid; neither error carries the token.
func (k *Keys) Verify(token string, now time.Time) (*Claims, error) {
	if k == nil {
		return nil, ErrInvalid
	}
	p := jwt.NewParser(
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithTimeFunc(func() time.Time { return now }),
		jwt.WithExpirationRequired(),
		jwt.WithIssuer(issuer),
		jwt.WithAudience(audience),
	)
	var c Claims
	_, err := p.ParseWithClaims(token, &c, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		key, ok := k.keys[kid]
		if !ok {
			return nil, errors.New("unknown key")
		}
		return key, nil
	})
	switch {
	case err == nil:
	case errors.Is(err, jwt.ErrTokenExpired):
		// Only a correctly signed token reaches the expiry check.
		return nil, ErrExpired
	default:
		return nil, ErrInvalid
	}
	if c.Subject == "" || c.ID == "" {
		return nil, ErrInvalid
	}
	return &c, nil
}

// ParseLength reads a session length: "30m", "1h", "1d", "1w", or any
// Go duration; "" is DefaultLength. It must lie within MinLength and
// MaxLength.
func ParseLength(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return DefaultLength, nil
	}
	var d time.Duration
	if n, unit := s[:len(s)-1], s[len(s)-1]; unit == 'd' || unit == 'w' {
		v, err := strconv.Atoi(n)
		if err != nil || v <= 0 {
			return 0, fmt.Errorf("session: session_length %q: want e.g. 30m, 1h, 1d, 1w", s)
		}
		day := 24 * time.Hour
		if unit == 'w' {
			day *= 7
		}
		if v > int(MaxLength/day) {
			return 0, fmt.Errorf("session: session_length %q: at most %s", s, "1w")
		}
		d = time.Duration(v) * day
	} else {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			return 0, fmt.Errorf("session: session_length %q: want e.g. 30m, 1h, 1d, 1w", s)
		}
	}
	if d < MinLength || d > MaxLength {
		return 0, fmt.Errorf("session: session_length %q: must be between 1m and 1w", s)
	}
	return d, nil
}

// MAC returns an HMAC-SHA256 of data for purpose under the signing key, to
// bind values such as CSRF tokens to a session without storing them.
func (k *Keys) MAC(purpose, data string) string {
	return k.primary + "." + macWith(k.keys[k.primary], purpose, data)
}

// VerifyMAC checks a value of MAC under any configured key.
func (k *Keys) VerifyMAC(purpose, data, mac string) bool {
	id, sum, ok := strings.Cut(mac, ".")
	key, known := k.keys[id]
	if !ok || !known {
		return false
	}
	return hmac.Equal([]byte(sum), []byte(macWith(key, purpose, data)))
}

func macWith(key []byte, purpose, data string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(purpose))
	m.Write([]byte{0})
	m.Write([]byte(data))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// ActionError is a refused action; its message names the action.
type ActionError struct{ Action Action }

func (e *ActionError) Error() string {
	return fmt.Sprintf("session: action %q is not allowed by this session's allow_actions", e.Action)
}

// Require returns an *ActionError when the session does not allow a.
func (c *Claims) Require(a Action) error {
	if c.Allows(a) {
		return nil
	}
	return &ActionError{Action: a}
}
