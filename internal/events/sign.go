package events

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"time"
)

// Webhook request headers.
const (
	HeaderEvent          = "X-Vaultfleet-Event"
	HeaderIdempotencyKey = "X-Vaultfleet-Idempotency-Key"
	HeaderSignature      = "X-Vaultfleet-Signature"
	HeaderAttempt        = "X-Vaultfleet-Attempt"
)

// DefaultTolerance is how old (or how far in the future) a signature's
// timestamp may be for Verify when tolerance is zero.
const DefaultTolerance = 5 * time.Minute

// Errors of Verify.
var (
	// ErrSignatureHeader means the header is missing or not
	// "t=<unix>,v1=<hex>".
	ErrSignatureHeader = errors.New("events: malformed signature header")
	// ErrSignatureTimestamp means the timestamp is outside the tolerance
	// (a replay, or a clock far off).
	ErrSignatureTimestamp = errors.New("events: signature timestamp outside tolerance")
	// ErrSignatureMismatch means no v1 signature matches the body.
	ErrSignatureMismatch = errors.New("events: signature does not match")
)

// Sign returns the X-Vaultfleet-Signature header value for body sent at t:
// "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>".
func Sign(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac(secret, ts, body))
}

func mac(secret, ts string, body []byte) []byte {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(nil)
}

// Verify checks a webhook request as a receiver should: header is the
// X-Vaultfleet-Signature value, body the raw request body. It rejects a
// timestamp more than tolerance away from now (DefaultTolerance if zero),
// so a captured request cannot be replayed later. Several v1= entries are
// accepted (any one matching is enough), for secret rotation.
func Verify(secret, header string, body []byte, now time.Time, tolerance time.Duration) error {
	if tolerance <= 0 {
		tolerance = DefaultTolerance
	}
	var ts string
	var sigs [][]byte
	for part := range strings.SplitSeq(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return ErrSignatureHeader
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			b, err := hex.DecodeString(v)
			if err != nil || len(b) != sha256.Size {
				return ErrSignatureHeader
			}
			sigs = append(sigs, b)
		}
	}
	if ts == "" || len(sigs) == 0 {
		return ErrSignatureHeader
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return ErrSignatureHeader
	}
	if d := now.Sub(time.Unix(sec, 0)); d > tolerance || d < -tolerance {
		return ErrSignatureTimestamp
	}
	want := mac(secret, ts, body)
	for _, s := range sigs {
		if hmac.Equal(s, want) {
			return nil
		}
	}
	return ErrSignatureMismatch
}
