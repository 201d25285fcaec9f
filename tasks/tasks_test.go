package tasks

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestMain(m *testing.M) { redistest.Main(m) }

// TestRefreshIsOneChainPerConnection: every trigger of a refresh (scheduled
// with any due time, expired, on demand) is the same task while one is
// queued or retrying, so a connection never has two refresh chains.
func TestRefreshIsOneChainPerConnection(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	first, err := NewRefreshTask("c9", "accounting+xero", ReasonScheduled, "1700000000")
	require.NoError(t, err)
	info, err := client.Enqueue(first)
	require.NoError(t, err)
	require.Equal(t, RefreshTaskID("c9", "accounting+xero"), info.ID)
	for _, tc := range []struct {
		reason Reason
		key    string
	}{{ReasonScheduled, "1700000120"}, {ReasonExpired, "1700000240"}, {ReasonOnDemand, ""}, {ReasonOnDemand, "0"}} {
		again, err := NewRefreshTask("c9", "accounting+xero", tc.reason, tc.key)
		require.NoError(t, err)
		_, err = client.Enqueue(again)
		require.ErrorIs(t, err, asynq.ErrTaskIDConflict, "reason %s key %q", tc.reason, tc.key)
	}
	other, err := NewRefreshTask("c9", "accounting+other", ReasonScheduled, "1700000000")
	require.NoError(t, err)
	_, err = client.Enqueue(other)
	require.NoError(t, err, "another connection is another chain")
}

func TestConstructorsQueueAndOptions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		desc      string
		build     func() (*asynq.Task, error)
		wantType  string
		wantQueue string
		wantID    string
		wantTO    time.Duration
	}{
		{"ValidateCredentialsChangedIsCritical", func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonCredentialsChanged, "rev3")
		}, TypeValidate, QueueCritical, "connection:validate:c1|crm+hubspot:rev3", ValidateTimeout},
		{"ValidateScheduledIsLow", func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonScheduled, "1700000000")
		}, TypeValidate, QueueLow, "connection:validate:c1|crm+hubspot:1700000000", ValidateTimeout},
		{"ValidateOnDemandNoDedupe", func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonOnDemand, "")
		}, TypeValidate, QueueCritical, "", ValidateTimeout},
		{"ValidateConfirmIsDefault", func() (*asynq.Task, error) {
			return NewValidateTask("c1", "crm+hubspot", ReasonConfirm, "c1")
		}, TypeValidate, QueueDefault, "connection:validate:c1|crm+hubspot:c1", ValidateTimeout},
		{"RefreshAheadIsCritical", func() (*asynq.Task, error) {
			return NewRefreshTask("c1", "accounting+xero", ReasonScheduled, "1700000000")
		}, TypeRefreshToken, QueueCritical, "connection:refresh_token:c1|accounting+xero", RefreshTimeout},
		{"RefreshExpiredIsCritical", func() (*asynq.Task, error) {
			return NewRefreshTask("c2", "accounting+xero", ReasonExpired, "1700000000")
		}, TypeRefreshToken, QueueCritical, "connection:refresh_token:c2|accounting+xero", RefreshTimeout},
		{"WebhookOnEvents", func() (*asynq.Task, error) {
			return NewWebhookTask("1700000000000-3", "crm-sync")
		}, TypeWebhookDeliver, QueueEvents, "webhook:crm-sync:1700000000000-3", WebhookTimeout},
	}
	// Enqueue for real and read back what asynq stored: the options are
	// what Redis holds, not what we think we passed.
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			task, err := tc.build()
			require.NoError(t, err)
			require.Equal(t, tc.wantType, task.Type())
			info, err := client.Enqueue(task)
			require.NoError(t, err)
			require.Equal(t, tc.wantQueue, info.Queue)
			if tc.wantID == "" {
				require.Len(t, info.ID, 36, "no dedupe: asynq assigns a UUID")
			} else {
				require.Equal(t, tc.wantID, info.ID)
				again, err := tc.build()
				require.NoError(t, err)
				_, err = client.Enqueue(again)
				require.ErrorIs(t, err, asynq.ErrTaskIDConflict, "the same key is one task")
			}
			require.Equal(t, tc.wantTO, info.Timeout)
			require.Positive(t, info.MaxRetry)
			// Timeouts are whole seconds: asynq drops sub-second ones.
			require.Zero(t, tc.wantTO%time.Second)
		})
	}
}

func TestConstructorsRefuseBadIDs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		desc     string
		consumer string
		conn     string
		reason   Reason
		key      string
	}{
		{"EmptyConsumer", "", "crm+hubspot", ReasonOnDemand, ""},
		{"ConsumerWithPipe", "a|b", "crm+hubspot", ReasonOnDemand, ""},
		{"ConnectionWithoutPlus", "c1", "hubspot", ReasonOnDemand, ""},
		{"UpperCaseConnection", "c1", "CRM+HubSpot", ReasonOnDemand, ""},
		{"UnknownReason", "c1", "crm+hubspot", "because", ""},
		{"KeyWithSpace", "c1", "crm+hubspot", ReasonScheduled, "a b"},
		{"LongConsumer", strings.Repeat("a", 129), "crm+hubspot", ReasonOnDemand, ""},
	}
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			_, err := NewValidateTask(tc.consumer, tc.conn, tc.reason, tc.key)
			require.ErrorIs(t, err, ErrMalformed)
		})
	}
	_, err := NewWebhookTask("not-an-id", "s")
	require.ErrorIs(t, err, ErrMalformed)
	_, err = NewWebhookTask("1-0", "")
	require.ErrorIs(t, err, ErrMalformed)
}

// TestGoldenPayloads pins the wire format: payloads other services have
// already enqueued must keep parsing.
func TestGoldenPayloads(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"validate_v1.json", "refresh_v1.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		require.NoError(t, err)
		p, err := ParseConnectionPayload(b)
		require.NoError(t, err, name)
		again, err := json.Marshal(p)
		require.NoError(t, err)
		require.JSONEq(t, string(b), string(again), name)
	}
	b, err := os.ReadFile(filepath.Join("testdata", "webhook_v1.json"))
	require.NoError(t, err)
	w, err := ParseWebhookPayload(b)
	require.NoError(t, err)
	require.Equal(t, "1764244800000-0", w.EventID)
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		desc    string
		payload string
		want    string
	}{
		{"NotJSON", `{"v":1,`, "invalid JSON"},
		{"WrongType", `{"v":"1"}`, "field v has the wrong type"},
		{"FutureVersion", `{"v":2,"consumer_id":"c","connection_id":"crm+x","reason":"scheduled"}`, "unsupported payload version 2"},
		{"MissingConsumer", `{"v":1,"connection_id":"crm+x","reason":"scheduled"}`, "consumer_id"},
		{"UnknownReason", `{"v":1,"consumer_id":"c","connection_id":"crm+x","reason":"whim"}`, `unknown reason "whim"`},
		{"Null", `null`, "unsupported payload version 0"},
	}
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			_, err := ParseConnectionPayload([]byte(tc.payload))
			require.ErrorIs(t, err, ErrMalformed)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

// FuzzParseConnectionPayload: parsing never panics, an accepted payload
// round-trips, and an error always wraps ErrMalformed and never quotes
// more than a short prefix of the input.
func FuzzParseConnectionPayload(f *testing.F) {
	f.Add([]byte(`{"v":1,"consumer_id":"c1","connection_id":"crm+hubspot","reason":"scheduled","key":"1700000000"}`))
	f.Add([]byte(`{"v":1,"consumer_id":"c1","connection_id":"crm+hubspot","reason":"on_demand"}`))
	f.Add([]byte(`{"v":2}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"v":1,"consumer_id":"` + strings.Repeat("x", 300) + `"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseConnectionPayload(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			if len(b) > 64 && bytes.Contains([]byte(err.Error()), b) {
				t.Fatalf("error echoes the payload")
			}
			return
		}
		task, err := newConnectionTask(TypeValidate, p.ConsumerID, p.ConnectionID, p.Reason, p.Key)
		if err != nil {
			t.Fatalf("accepted payload does not rebuild: %v", err)
		}
		q, err := ParseConnectionPayload(task.Payload())
		if err != nil || q != p {
			t.Fatalf("round trip: %+v -> %+v (%v)", p, q, err)
		}
	})
}

func FuzzParseWebhookPayload(f *testing.F) {
	f.Add([]byte(`{"v":1,"event_id":"1-0","subscription":"s"}`))
	f.Add([]byte(`{"v":1,"event_id":"x","subscription":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseWebhookPayload(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			return
		}
		if _, err := NewWebhookTask(p.EventID, p.Subscription); err != nil {
			t.Fatalf("accepted payload does not rebuild: %v", err)
		}
	})
}
