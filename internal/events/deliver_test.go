package events_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestSignVerify(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	body := []byte(`{"id":"x","type":"vault.connection.callable"}`)
	h := events.Sign(secret, now, body)
	require.True(t, strings.HasPrefix(h, "t=1700000000,v1="), h)
	require.NoError(t, events.Verify(secret, h, body, now, 0))
	require.NoError(t, events.Verify(secret, h, body, now.Add(4*time.Minute), 0))
	require.NoError(t, events.Verify(secret, h, body, now.Add(-4*time.Minute), 0), "small clock skew is fine")

	cases := []struct {
		desc   string
		secret string
		header string
		body   []byte
		now    time.Time
		tol    time.Duration
		want   error
	}{
		{"TamperedBody", secret, h, []byte(`{"id":"y"}`), now, 0, events.ErrSignatureMismatch},
		{"WrongSecret", "another-secret-0000", h, body, now, 0, events.ErrSignatureMismatch},
		{"Replayed", secret, h, body, now.Add(6 * time.Minute), 0, events.ErrSignatureTimestamp},
		{"ReplayedCustomTolerance", secret, h, body, now.Add(2 * time.Minute), time.Minute, events.ErrSignatureTimestamp},
		{"FromTheFuture", secret, h, body, now.Add(-10 * time.Minute), 0, events.ErrSignatureTimestamp},
		{"OtherTimestamp", secret, strings.Replace(h, "t=1700000000", "t=1700000001", 1), body, now, 0, events.ErrSignatureMismatch},
		{"Empty", secret, "", body, now, 0, events.ErrSignatureHeader},
		{"NoV1", secret, "t=1700000000", body, now, 0, events.ErrSignatureHeader},
		{"NoT", secret, h[strings.Index(h, "v1="):], body, now, 0, events.ErrSignatureHeader},
		{"BadHex", secret, "t=1700000000,v1=zz", body, now, 0, events.ErrSignatureHeader},
		{"ShortMAC", secret, "t=1700000000,v1=abcd", body, now, 0, events.ErrSignatureHeader},
		{"BadTime", secret, strings.Replace(h, "t=1700000000", "t=soon", 1), body, now, 0, events.ErrSignatureHeader},
		{"Garbage", secret, "garbage", body, now, 0, events.ErrSignatureHeader},
	}
	for _, c := range cases {
		t.Run(c.desc, func(t *testing.T) {
			require.ErrorIs(t, events.Verify(c.secret, c.header, c.body, c.now, c.tol), c.want)
		})
	}
	// Several v1 entries (secret rotation): one match is enough.
	other := events.Sign("old-secret-000000", now, body)
	multi := h + "," + other[strings.Index(other, "v1="):]
	require.NoError(t, events.Verify(secret, multi, body, now, 0))
	require.NoError(t, events.Verify("old-secret-000000", multi, body, now, 0))
}

func TestCheckURLHostRules(t *testing.T) {
	t.Parallel()
	cases := []struct {
		url      string
		insecure bool
		ok       bool
	}{
		{"https://hooks.example.com/vault", false, true},
		{"https://hooks.example.com:8443/vault?x=1", false, true},
		{"https://8.8.8.8/hook", false, true},
		{"https://[2001:4860:4860::8888]/hook", false, true},
		{"http://hooks.example.com/vault", false, false},
		{"http://hooks.example.com/vault", true, true},
		{"https://localhost/hook", false, false},
		{"https://LOCALHOST./hook", false, false},
		{"https://api.localhost/hook", false, false},
		{"https://127.0.0.1/hook", false, false},
		{"https://127.1/hook", false, false},
		{"https://2130706433/hook", false, false},
		{"https://0x7f000001/hook", false, false},
		{"https://[::1]/hook", false, false},
		{"https://[::ffff:127.0.0.1]/hook", false, false},
		{"https://10.0.0.8/hook", false, false},
		{"https://172.16.3.4/hook", false, false},
		{"https://192.168.1.1/hook", false, false},
		{"https://169.254.169.254/latest/meta-data", false, false},
		{"https://[fe80::1]/hook", false, false},
		{"https://[fd00::1]/hook", false, false},
		{"https://100.64.0.1/hook", false, false},
		{"https://0.0.0.0/hook", false, false},
		{"https://224.0.0.1/hook", false, false},
		// Special-purpose ranges that lead back inside: NAT64 (reaches
		// 169.254.169.254 on IPv6-only clusters), 6to4, IETF protocol
		// assignments, benchmarking, reserved and broadcast.
		{"https://[64:ff9b::a9fe:a9fe]/hook", false, false},
		{"https://[64:ff9b::7f00:1]/hook", false, false},
		{"https://[2002:7f00:1::1]/hook", false, false},
		{"https://192.0.0.170/hook", false, false},
		{"https://198.18.0.1/hook", false, false},
		{"https://198.19.255.254/hook", false, false},
		{"https://240.0.0.1/hook", false, false},
		{"https://255.255.255.255/hook", false, false},
		{"http://127.0.0.1:8080/hook", true, true},
		{"https://localhost:8443/hook", true, true},
		{"https://user:s3cr3tpw@hooks.example.com/hook", false, false},
		{"https://user:s3cr3tpw@127.0.0.1/hook", true, false},
		{"https://token@hooks.example.com/hook", false, false},
		{"ftp://hooks.example.com/hook", true, false},
		{"//hooks.example.com/hook", false, false},
		{"/hook", false, false},
		{"https:///hook", false, false},
		{"", false, false},
		{"https://hooks example.com/", false, false},
	}
	for _, c := range cases {
		err := events.CheckURL(c.url, c.insecure)
		if c.ok {
			require.NoError(t, err, c.url)
			continue
		}
		require.ErrorIs(t, err, events.ErrURLNotAllowed, c.url)
		require.NotContains(t, err.Error(), "s3cr3tpw", "user info is never echoed")
	}
}

func TestParseSubscriptions(t *testing.T) {
	t.Parallel()
	env := map[string]string{"HOOK_SECRET": secret, "SHORT": "tooshort"}
	getenv := func(k string) string { return env[k] }
	subs, err := events.ParseSubscriptions([]byte(`
- name: billing
  url: https://hooks.example.com/vault
  secret_env: HOOK_SECRET
  events: [vault.connection.invalid, vault.connection.callable]
- name: dev.local
  url: http://127.0.0.1:9000/hook
  secret_env: HOOK_SECRET
  allow_insecure: true
`), getenv)
	require.NoError(t, err)
	require.Len(t, subs, 2)
	require.Equal(t, secret, subs[0].Secret)
	require.True(t, subs[0].Matches(state.EventInvalid))
	require.False(t, subs[0].Matches(state.EventUpdated))
	require.True(t, subs[1].Matches(state.EventUpdated), "no filter: every event")

	empty, err := events.ParseSubscriptions(nil, getenv)
	require.NoError(t, err)
	require.Empty(t, empty)

	bad := []struct{ desc, yaml, want string }{
		{"UnknownField", "- name: a\n  url: https://h.example.com\n  secret_env: HOOK_SECRET\n  secret: x\n", "field secret not found"},
		{"BadName", "- name: 'a b'\n  url: https://h.example.com\n  secret_env: HOOK_SECRET\n", "name"},
		{"NoName", "- url: https://h.example.com\n  secret_env: HOOK_SECRET\n", "webhook 1: name"},
		{"Duplicate", "- name: a\n  url: https://h.example.com\n  secret_env: HOOK_SECRET\n- name: a\n  url: https://h.example.com\n  secret_env: HOOK_SECRET\n", "listed twice"},
		{"Loopback", "- name: a\n  url: https://127.0.0.1/x\n  secret_env: HOOK_SECRET\n", "url"},
		{"HTTP", "- name: a\n  url: http://h.example.com/x\n  secret_env: HOOK_SECRET\n", "https"},
		{"UnknownEvent", "- name: a\n  url: https://h.example.com\n  secret_env: HOOK_SECRET\n  events: [vault.connection.exploded]\n", "unknown event type"},
		{"NoSecretEnv", "- name: a\n  url: https://h.example.com\n", "secret_env"},
		{"UnsetSecret", "- name: a\n  url: https://h.example.com\n  secret_env: NOPE\n", "NOPE is unset"},
		{"ShortSecret", "- name: a\n  url: https://h.example.com\n  secret_env: SHORT\n", "shorter than 16"},
		{"NotAList", "name: a\n", "cannot unmarshal"},
	}
	for _, c := range bad {
		t.Run(c.desc, func(t *testing.T) {
			_, err := events.ParseSubscriptions([]byte(c.yaml), getenv)
			require.ErrorContains(t, err, c.want)
			require.NotContains(t, err.Error(), secret)
			require.NotContains(t, err.Error(), "tooshort")
		})
	}

	dir := t.TempDir()
	path := filepath.Join(dir, "webhooks.yaml")
	require.NoError(t, os.WriteFile(path, []byte("- name: a\n  url: https://h.example.com\n  secret_env: SHORT\n"), 0o600))
	_, err = events.LoadSubscriptions(path, getenv)
	require.ErrorContains(t, err, path)
	_, err = events.LoadSubscriptions(filepath.Join(dir, "missing.yaml"), getenv)
	require.Error(t, err)

	none, err := events.LoadFromEnv(getenv)
	require.NoError(t, err)
	require.Nil(t, none)
	env[events.EnvWebhooks] = path
	_, err = events.LoadFromEnv(getenv)
	require.ErrorContains(t, err, "VAULTFLEET_WEBHOOKS: "+path)
}

// deliveryBundle is a handler with one subscription pointed at a test
// receiver, and one stored event.
type deliveryBundle struct {
	rdb     *redis.Client
	h       *events.DeliveryHandler
	reg     *prometheus.Registry
	eventID string
}

func newDeliveryBundle(t *testing.T, handler http.HandlerFunc) *deliveryBundle {
	t.Helper()
	rdb := redistest.Start(t).Client(t)
	srv := httptest.NewServer(handler)
	t.Cleanup(srv.Close)
	reg := prometheus.NewRegistry()
	h, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""), Registerer: reg, Timeout: 300 * time.Millisecond,
		Subscriptions: []events.Subscription{{Name: "sub", URL: srv.URL + "/hook?token=receiver-token-123", Secret: secret, AllowInsecure: true}}})
	require.NoError(t, err)
	ids := addEntries(t, rdb, 1, state.EventCallable)
	return &deliveryBundle{rdb: rdb, h: h, reg: reg, eventID: ids[0]}
}

func (b *deliveryBundle) deliver(t *testing.T, eventID, sub string) error {
	t.Helper()
	task, err := tasks.NewWebhookTask(eventID, sub)
	require.NoError(t, err)
	return b.h.ProcessTask(context.Background(), task)
}

func TestDeliveryOutcomes(t *testing.T) {
	t.Parallel()
	t.Run("Delivered", func(t *testing.T) {
		t.Parallel()
		var got http.Header
		var body []byte
		b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
			got, body = r.Header.Clone(), mustRead(r)
			w.WriteHeader(http.StatusNoContent)
		})
		require.NoError(t, b.deliver(t, b.eventID, "sub"))
		key := tasks.IdempotencyKey(b.eventID, "sub")
		require.Equal(t, key, got.Get(events.HeaderIdempotencyKey))
		require.Equal(t, state.EventCallable, got.Get(events.HeaderEvent))
		require.Equal(t, "application/json", got.Get("Content-Type"))
		require.Equal(t, "1", got.Get(events.HeaderAttempt))
		require.NoError(t, events.Verify(secret, got.Get(events.HeaderSignature), body, time.Now(), 0))
		var wh map[string]any
		require.NoError(t, json.Unmarshal(body, &wh))
		require.Equal(t, key, wh["id"])
		require.Equal(t, state.EventCallable, wh["type"])
		require.NotEmpty(t, wh["created_at"])
		data := wh["data"].(map[string]any)
		for _, f := range []string{"connection_id", "consumer_id", "service_id", "unified_api", "state_before",
			"state_after", "health_before", "health_after", "reason", "version"} {
			require.Contains(t, data, f)
		}
		require.Equal(t, "crm+pipedrive", data["connection_id"])
		require.Equal(t, float64(1), counter(t, b.reg, "vaultfleet_webhook_deliveries_total", events.OutcomeDelivered))
	})
	t.Run("Gone410Archives", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusGone) })
		err := b.deliver(t, b.eventID, "sub")
		require.ErrorIs(t, err, asynq.SkipRetry)
		require.ErrorIs(t, err, events.ErrSubscriptionGone)
		require.Equal(t, float64(1), counter(t, b.reg, "vaultfleet_webhook_deliveries_total", events.OutcomeGone))
	})
	t.Run("ServerErrorRetries", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusBadGateway) })
		err := b.deliver(t, b.eventID, "sub")
		require.Error(t, err)
		require.NotErrorIs(t, err, asynq.SkipRetry)
		require.Contains(t, err.Error(), "HTTP 502")
		require.Equal(t, float64(1), counter(t, b.reg, "vaultfleet_webhook_deliveries_total", events.OutcomeFailed))
		d := events.RetryDelay(0, err, nil)
		require.True(t, d >= 8*time.Second && d <= 12*time.Second, d)
	})
	t.Run("RetryAfterHonoured", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
		})
		err := b.deliver(t, b.eventID, "sub")
		var ra *events.RetryAfterError
		require.ErrorAs(t, err, &ra)
		require.Equal(t, 7*time.Second, events.RetryDelay(3, err, nil))
	})
	t.Run("TimeoutRetriesWithoutEchoingTheURL", func(t *testing.T) {
		t.Parallel()
		release := make(chan struct{})
		b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		defer close(release)
		err := b.deliver(t, b.eventID, "sub")
		require.Error(t, err)
		require.NotErrorIs(t, err, asynq.SkipRetry)
		require.NotContains(t, err.Error(), "receiver-token-123")
		require.Contains(t, err.Error(), "timeout")
	})
	t.Run("RedirectElsewhereNotFollowed", func(t *testing.T) {
		t.Parallel()
		var other atomic.Int64
		elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { other.Add(1) }))
		defer elsewhere.Close()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, elsewhere.URL+"/steal", http.StatusTemporaryRedirect)
		})
		err := b.deliver(t, b.eventID, "sub")
		require.Error(t, err)
		require.Zero(t, other.Load(), "a redirect to another host is never followed")
		require.NotContains(t, err.Error(), "receiver-token-123")
	})
	t.Run("SameHost307Followed", func(t *testing.T) {
		t.Parallel()
		var posts atomic.Int64
		b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/hook" {
				http.Redirect(w, r, "/moved", http.StatusPermanentRedirect)
				return
			}
			if r.Method == http.MethodPost && len(mustRead(r)) > 0 {
				posts.Add(1)
			}
		})
		require.NoError(t, b.deliver(t, b.eventID, "sub"))
		require.Equal(t, int64(1), posts.Load())
	})
	t.Run("Found302NotFollowed", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/login", http.StatusFound)
		})
		require.ErrorContains(t, b.deliver(t, b.eventID, "sub"), "HTTP 302")
	})
	t.Run("HugeResponseCapped", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) {
			chunk := strings.Repeat("x", 64<<10)
			for range 1024 { // 64 MiB if read to the end
				if _, err := io.WriteString(w, chunk); err != nil {
					return
				}
			}
		})
		start := time.Now()
		require.NoError(t, b.deliver(t, b.eventID, "sub"))
		require.Less(t, time.Since(start), 5*time.Second)
	})
	t.Run("TrimmedEventArchives", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) { t.Error("no request expected") })
		err := b.deliver(t, "1-0", "sub")
		require.ErrorIs(t, err, asynq.SkipRetry)
		require.ErrorIs(t, err, events.ErrEventGone)
		require.Equal(t, float64(1), counter(t, b.reg, "vaultfleet_webhook_deliveries_total", events.OutcomeDropped))
	})
	t.Run("UnknownSubscriptionArchives", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) { t.Error("no request expected") })
		err := b.deliver(t, b.eventID, "removed")
		require.ErrorIs(t, err, asynq.SkipRetry)
		require.ErrorIs(t, err, events.ErrUnknownSubscription)
	})
	t.Run("MalformedPayloadArchives", func(t *testing.T) {
		t.Parallel()
		b := newDeliveryBundle(t, func(w http.ResponseWriter, _ *http.Request) { t.Error("no request expected") })
		for _, p := range []string{`{`, `{"v":1,"event_id":"x","subscription":"sub"}`, `{"v":9,"event_id":"1-0","subscription":"sub"}`} {
			err := b.h.ProcessTask(context.Background(), asynq.NewTask(tasks.TypeWebhookDeliver, []byte(p)))
			require.ErrorIs(t, err, asynq.SkipRetry, p)
			require.ErrorIs(t, err, tasks.ErrMalformed, p)
		}
	})
}

func mustRead(r *http.Request) []byte {
	b, _ := io.ReadAll(r.Body)
	return b
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	// Exponential from 10s, capped at 1h, with ±20% jitter: every draw
	// stays within the band of its attempt, so the bands grow.
	for n := range 20 {
		base := min(10*time.Second<<min(n, 20), time.Hour)
		for range 50 {
			d := events.RetryDelay(n, errors.New("HTTP 500"), nil)
			require.GreaterOrEqual(t, d, base-base/5, n)
			require.LessOrEqual(t, d, base+base/5, n)
		}
	}
	require.Equal(t, time.Second, events.RetryDelay(0, &events.RetryAfterError{After: 0, Err: errors.New("x")}, nil))
}

func TestNewDeliveryHandlerValidates(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	_, err := events.NewDeliveryHandler(events.DeliveryConfig{})
	require.Error(t, err)
	_, err = events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""),
		Subscriptions: []events.Subscription{{Name: "a", URL: "https://10.0.0.1/x", Secret: secret}}})
	require.ErrorIs(t, err, events.ErrURLNotAllowed)
	_, err = events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""),
		Subscriptions: []events.Subscription{{Name: "a", URL: "https://h.example.com/x"}}})
	require.ErrorContains(t, err, "secret")
	_, err = events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, "")})
	require.ErrorContains(t, err, "Enqueuer")
}
