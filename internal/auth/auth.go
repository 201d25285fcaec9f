// Package auth checks API tokens: bearer tokens for programs, and the same
// tokens as basic-auth passwords for browsers (the Asynq monitor, the status
// page). Tokens are compared in constant time.
package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"net/http"
	"strconv"
	"strings"
)

// EnvTokens is the environment variable the tokens are read from.
const EnvTokens = "VAULTFLEET_API_TOKENS"

// ErrNoTokens means no API token is configured.
var ErrNoTokens = errors.New("auth: no API token configured (set " + EnvTokens + "=token[,token...])")

// MinTokenLength is the shortest token accepted.
const MinTokenLength = 16

// Tokens is a set of API tokens.
type Tokens struct {
	sums [][sha256.Size]byte
}

// ParseTokens reads a comma-separated list. Errors name the position of a
// bad token, never the token.
func ParseTokens(spec string) (*Tokens, error) {
	t := &Tokens{}
	for i, tok := range strings.Split(spec, ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		if len(tok) < MinTokenLength {
			return nil, errors.New("auth: token " + strconv.Itoa(i+1) + " is shorter than 16 characters")
		}
		t.sums = append(t.sums, sha256.Sum256([]byte(tok)))
	}
	if len(t.sums) == 0 {
		return nil, ErrNoTokens
	}
	return t, nil
}

// Valid reports whether tok is one of the tokens. Every configured token is
// compared, in constant time, whatever matches.
func (t *Tokens) Valid(tok string) bool {
	if t == nil || tok == "" {
		return false
	}
	sum := sha256.Sum256([]byte(tok))
	ok := 0
	for _, s := range t.sums {
		ok |= subtle.ConstantTimeCompare(sum[:], s[:])
	}
	return ok == 1
}

// Len is the number of tokens.
func (t *Tokens) Len() int {
	if t == nil {
		return 0
	}
	return len(t.sums)
}

// Bearer reports whether r carries "Authorization: Bearer <valid token>".
func (t *Tokens) Bearer(r *http.Request) bool {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	return ok && strings.EqualFold(scheme, "Bearer") && t.Valid(strings.TrimSpace(tok))
}

// Browser reports whether r carries a valid bearer token, or basic auth
// whose password is a valid token (any user name).
func (t *Tokens) Browser(r *http.Request) bool {
	if t.Bearer(r) {
		return true
	}
	_, pw, ok := r.BasicAuth()
	return ok && t.Valid(pw)
}
