package events

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/vaultfleet/vaultfleet/state"
)

// Webhook body formats (Subscription.Format).
const (
	// FormatVaultfleet is the default: the Webhook body, signed with a
	// timestamp (X-Vaultfleet-Signature) so that a captured request cannot
	// be replayed later.
	FormatVaultfleet = "vaultfleet"
	// FormatApideck is Apideck Vault's body,
	// {"payload": {event_id, event_type, ...}}, with the x-apideck-*
	// headers, for receivers written for Apideck. Its signature has no
	// timestamp; X-Vaultfleet-Signature is sent as well, and receivers
	// should prefer it (Verify).
	FormatApideck = "apideck"
)

// Apideck webhook headers.
const (
	HeaderApideckEventType      = "x-apideck-event-type"
	HeaderApideckSignature      = "x-apideck-signature"
	HeaderApideckIdempotencyKey = "x-apideck-idempotency-key"
)

// ApideckEntityType is the entity_type of every vault event.
const ApideckEntityType = "Connection"

// ErrApideckSignature means an x-apideck-signature does not match.
var ErrApideckSignature = errors.New("events: apideck signature does not match")

// apideckEntity is the connection as the event knows it; health is
// Apideck's, health_detail vaultfleet's own.
type apideckEntity struct {
	ID           string `json:"id"`
	ConsumerID   string `json:"consumer_id"`
	ServiceID    string `json:"service_id"`
	UnifiedAPI   string `json:"unified_api"`
	State        string `json:"state,omitempty"`
	StateBefore  string `json:"state_before,omitempty"`
	Health       string `json:"health,omitempty"`
	HealthDetail string `json:"health_detail,omitempty"`
	Reason       string `json:"reason,omitempty"`
	Version      int64  `json:"version"`
}

// apideckPayload is Apideck's webhook payload.
type apideckPayload struct {
	EventID          string        `json:"event_id"`
	EventType        string        `json:"event_type"`
	UnifiedAPI       string        `json:"unified_api"`
	ServiceID        string        `json:"service_id"`
	ConsumerID       string        `json:"consumer_id"`
	EntityID         string        `json:"entity_id"`
	EntityType       string        `json:"entity_type"`
	Entity           apideckEntity `json:"entity"`
	ExecutionAttempt int           `json:"execution_attempt"`
	OccurredAt       string        `json:"occurred_at"`
}

// apideckBody builds Apideck's body for wh (eventID: the stream entry id,
// the same for every subscription). Object keys are sorted at every level
// and nothing is HTML-escaped, which is what Apideck's receivers sign:
// JSON.stringify of the body with its keys sorted.
func apideckBody(wh Webhook, eventID string, attempt int) ([]byte, error) {
	d := wh.Data
	health, healthBefore := state.Health(d.HealthAfter), state.Health(d.HealthBefore)
	entity := apideckEntity{ID: d.ConnectionID, ConsumerID: d.ConsumerID, ServiceID: d.ServiceID,
		UnifiedAPI: d.UnifiedAPI, State: d.StateAfter, StateBefore: d.StateBefore, Reason: d.Reason, Version: d.Version}
	if health == "" && healthBefore != "" { // deleted: the health it had
		health = healthBefore
	}
	if entity.State == "" {
		entity.State = string(state.Available)
	}
	if health != "" {
		entity.Health, entity.HealthDetail = string(health.Apideck()), string(health)
	}
	p := apideckPayload{EventID: eventID, EventType: wh.Type, UnifiedAPI: d.UnifiedAPI, ServiceID: d.ServiceID,
		ConsumerID: d.ConsumerID, EntityID: d.ConnectionID, EntityType: ApideckEntityType, Entity: entity,
		ExecutionAttempt: attempt, OccurredAt: wh.CreatedAt.UTC().Format(time.RFC3339Nano)}
	return sortedJSON(map[string]any{"payload": p})
}

// sortedJSON encodes v with every object's keys sorted (by a round trip
// through maps, which encoding/json writes sorted) and no HTML escaping.
func sortedJSON(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var generic any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&generic); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(generic); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}), nil
}

// SignApideck returns the x-apideck-signature of body: base64 of
// HMAC-SHA256(secret, body). Apideck keys it with the API key; vaultfleet
// with the subscription's secret.
func SignApideck(secret string, body []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(body)
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// VerifyApideck checks an x-apideck-signature in constant time. It cannot
// tell a replay from a first delivery: prefer Verify on the
// X-Vaultfleet-Signature that is sent with it.
func VerifyApideck(secret, header string, body []byte) error {
	got, err := base64.StdEncoding.DecodeString(header)
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(body)
	if err != nil || !hmac.Equal(got, m.Sum(nil)) {
		return ErrApideckSignature
	}
	return nil
}

// encodeWebhook returns the body for the subscription's format.
func encodeWebhook(sub *Subscription, wh Webhook, eventID string, attempt int) ([]byte, error) {
	if sub.Format == FormatApideck {
		return apideckBody(wh, eventID, attempt)
	}
	return json.Marshal(wh)
}

// setFormatHeaders adds the headers of the subscription's format (the
// vaultfleet headers and timestamped signature are always set).
func setFormatHeaders(h http.Header, sub *Subscription, wh Webhook, key string, body []byte) {
	if sub.Format != FormatApideck {
		return
	}
	h.Set(HeaderApideckEventType, wh.Type)
	h.Set(HeaderApideckIdempotencyKey, key)
	h.Set(HeaderApideckSignature, SignApideck(sub.Secret, body))
}
