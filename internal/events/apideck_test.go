package events_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// sortKeysJSON is what an Apideck receiver signs: the body parsed and
// written again with every object's keys sorted, without spaces.
func sortKeysJSON(t *testing.T, body []byte) []byte {
	t.Helper()
	var v any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	require.NoError(t, dec.Decode(&v))
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	require.NoError(t, enc.Encode(v))
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'})
}

func TestApideckWebhookFormat(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	var got http.Header
	var body []byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, body = r.Header.Clone(), mustRead(r)
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	h, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""), Registerer: prometheus.NewRegistry(),
		Subscriptions: []events.Subscription{{Name: "apideck", URL: srv.URL, Secret: secret, AllowInsecure: true,
			Format: events.FormatApideck}}})
	require.NoError(t, err)
	id, err := rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: state.DefaultEventStream, Values: []any{
		"type", state.EventInvalid, "connection_id", "crm+pipedrive", "consumer_id", "c<1>&",
		"service_id", "pipedrive", "unified_api", "crm", "state_before", "callable", "state_after", "invalid",
		"health_before", "ok", "health_after", string(state.HealthRotationLost), "reason", "rotation_lost",
		"version", "7", "time", "2026-11-30T08:00:00.123Z"}}).Result()
	require.NoError(t, err)
	task, err := tasks.NewWebhookTask(id, "apideck")
	require.NoError(t, err)
	require.NoError(t, h.ProcessTask(context.Background(), task))

	key := tasks.IdempotencyKey(id, "apideck")
	require.Equal(t, state.EventInvalid, got.Get(events.HeaderApideckEventType))
	require.Equal(t, key, got.Get(events.HeaderApideckIdempotencyKey))
	require.NoError(t, events.VerifyApideck(secret, got.Get(events.HeaderApideckSignature), body))
	require.ErrorIs(t, events.VerifyApideck("another-secret-000", got.Get(events.HeaderApideckSignature), body),
		events.ErrApideckSignature)
	require.ErrorIs(t, events.VerifyApideck(secret, got.Get(events.HeaderApideckSignature),
		bytes.Replace(body, []byte(`"invalid"`), []byte(`"callable"`), 1)), events.ErrApideckSignature)
	// The replay-safe signature is sent too, over the same bytes.
	require.NoError(t, events.Verify(secret, got.Get(events.HeaderSignature), body, time.Now(), 0))
	// Keys sorted, no HTML escaping: the bytes an Apideck receiver signs.
	require.Equal(t, string(sortKeysJSON(t, body)), string(body))
	require.Contains(t, string(body), `"consumer_id":"c<1>&"`)

	var wh struct {
		Payload struct {
			EventID          string `json:"event_id"`
			EventType        string `json:"event_type"`
			ServiceID        string `json:"service_id"`
			UnifiedAPI       string `json:"unified_api"`
			ConsumerID       string `json:"consumer_id"`
			EntityID         string `json:"entity_id"`
			EntityType       string `json:"entity_type"`
			ExecutionAttempt int    `json:"execution_attempt"`
			OccurredAt       string `json:"occurred_at"`
			Entity           struct {
				ID           string `json:"id"`
				State        string `json:"state"`
				Health       string `json:"health"`
				HealthDetail string `json:"health_detail"`
			} `json:"entity"`
		} `json:"payload"`
	}
	var raw map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(body, &raw))
	require.Len(t, raw, 1, "only payload at the top")
	require.NoError(t, json.Unmarshal(body, &wh))
	p := wh.Payload
	require.Equal(t, id, p.EventID)
	require.Equal(t, state.EventInvalid, p.EventType)
	require.Equal(t, "pipedrive", p.ServiceID)
	require.Equal(t, "crm", p.UnifiedAPI)
	require.Equal(t, "crm+pipedrive", p.EntityID)
	require.Equal(t, events.ApideckEntityType, p.EntityType)
	require.Equal(t, 1, p.ExecutionAttempt)
	require.Equal(t, "2026-11-30T08:00:00.123Z", p.OccurredAt)
	require.Equal(t, "invalid", p.Entity.State)
	require.Equal(t, "needs_auth", p.Entity.Health, "Apideck has no rotation_lost")
	require.Equal(t, "rotation_lost", p.Entity.HealthDetail)
}

func TestDefaultWebhookFormatHasNoApideckHeaders(t *testing.T) {
	t.Parallel()
	var got http.Header
	b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Clone()
		w.WriteHeader(http.StatusOK)
	})
	require.NoError(t, b.deliver(t, b.eventID, "sub"))
	require.Empty(t, got.Get(events.HeaderApideckSignature))
	require.NotEmpty(t, got.Get(events.HeaderSignature))
}

func TestSubscriptionFormat(t *testing.T) {
	t.Parallel()
	getenv := func(string) string { return secret }
	subs, err := events.ParseSubscriptions([]byte(`
- name: a
  url: https://hooks.example.com/vault
  secret_env: S
  format: apideck
`), getenv)
	require.NoError(t, err)
	require.Equal(t, events.FormatApideck, subs[0].Format)
	_, err = events.ParseSubscriptions([]byte(`
- name: a
  url: https://hooks.example.com/vault
  secret_env: S
  format: xml
`), getenv)
	require.ErrorContains(t, err, `format: "xml" is not one of vaultfleet, apideck`)
	_, err = events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(redistest.Start(t).Client(t), ""),
		Subscriptions: []events.Subscription{{Name: "a", URL: "https://hooks.example.com", Secret: secret, Format: "xml"}}})
	require.ErrorContains(t, err, "format")
}
