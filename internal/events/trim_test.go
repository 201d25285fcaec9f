package events_test

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestEventsSurviveTrimmingDuringAnOutage: the receiver is down while the
// stream (capped at a tiny MAXLEN) is trimmed far past the events being
// delivered. Every event is still delivered once the receiver is back,
// with the idempotency key of its first attempt and its own data.
func TestEventsSurviveTrimmingDuringAnOutage(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A Redis of its own: this test runs for seconds and must not hold
	// one of the shared server's databases that long.
	rsrv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: rsrv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys, EventMaxLen: 1})
	require.NoError(t, err)

	recv := newReceiver(t)
	recv.down.Store(true)
	subs, err := events.ParseSubscriptions([]byte(fmt.Sprintf(`
- name: flips
  url: %s/hooks/flips
  secret_env: TEST_WEBHOOK_SECRET
  events: [vault.connection.callable, vault.connection.invalid]
  allow_insecure: true
`, recv.srv.URL)), func(string) string { return secret })
	require.NoError(t, err)

	reg := prometheus.NewRegistry()
	h, err := events.NewDeliveryHandler(events.DeliveryConfig{Events: state.NewEventStream(rdb, ""), Subscriptions: subs, Registerer: reg, Timeout: 2 * time.Second})
	require.NoError(t, err)
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency: 4,
		Queues:      map[string]int{tasks.QueueEvents: 1},
		// 16 retries 400ms apart outlast the outage below even under
		// -race on a busy machine (a real delivery retries for ~10 h).
		RetryDelayFunc:           func(int, error, *asynq.Task) time.Duration { return 400 * time.Millisecond },
		DelayedTaskCheckInterval: 100 * time.Millisecond,
		TaskCheckInterval:        50 * time.Millisecond,
		LogLevel:                 asynq.FatalLevel,
	})
	mux := asynq.NewServeMux()
	mux.Handle(tasks.TypeWebhookDeliver, h)
	require.NoError(t, srv.Start(mux))
	t.Cleanup(srv.Shutdown)
	client := asynq.NewClientFromRedisClient(rdb)
	relay, err := events.NewRelay(events.RelayConfig{Events: state.NewEventStream(rdb, ""), Enqueuer: client, Subscriptions: subs,
		Block: 100 * time.Millisecond, Registerer: reg})
	require.NoError(t, err)
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(ctx) }()

	// Five connections become callable: five events for "flips".
	want := map[string]state.Event{}
	for i := range 5 {
		ref := state.Ref{ConsumerID: fmt.Sprintf("trim-%d", i), ConnectionID: "crm+pipedrive"}
		ch, err := st.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
		require.NoError(t, err)
		ch, err = st.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
		require.NoError(t, err)
		require.Len(t, ch.Events, 1)
		e := ch.Events[0]
		require.Equal(t, state.EventCallable, e.Type)
		want[tasks.IdempotencyKey(e.ID, "flips")] = e
	}
	// Every delivery fails at least once while the receiver is down.
	require.Eventually(t, func() bool {
		got, _ := recv.snapshot()
		for k := range want {
			if len(got[k]) == 0 {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "every delivery tried while the receiver is down")

	// The stream moves on far past the cap: the events are trimmed away.
	filler := state.Ref{ConsumerID: "filler", ConnectionID: "crm+pipedrive"}
	_, err = st.Put(ctx, filler, state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
	require.NoError(t, err)
	for i := range 200 { // two stream nodes of 100 entries: the first is trimmed
		on := i%2 == 1
		_, err := st.Patch(ctx, filler, state.Input{Enabled: &on}, 0)
		require.NoError(t, err)
	}
	for _, e := range want {
		msgs, err := rdb.XRange(ctx, state.DefaultEventStream, e.ID, e.ID).Result()
		require.NoError(t, err)
		require.Empty(t, msgs, "event %s trimmed from the stream", e.ID)
	}

	recv.down.Store(false)
	require.Eventually(t, func() bool {
		got, _ := recv.snapshot()
		for k := range want {
			as := got[k]
			if len(as) == 0 || as[len(as)-1].status != http.StatusOK {
				return false
			}
		}
		return true
	}, 20*time.Second, 20*time.Millisecond, "every event delivered after the receiver came back")

	got, badSigs := recv.snapshot()
	require.Zero(t, badSigs)
	require.Len(t, got, len(want), "no other delivery")
	for key, as := range got {
		e := want[key]
		for _, a := range as {
			require.Equal(t, key, a.body.ID, "the same idempotency key on every attempt")
			require.Equal(t, state.EventCallable, a.body.Type)
			require.Equal(t, e.ConsumerID, a.body.Data.ConsumerID)
			require.Equal(t, e.ConnectionID, a.body.Data.ConnectionID)
			require.Equal(t, string(e.StateBefore), a.body.Data.StateBefore)
			require.Equal(t, string(e.StateAfter), a.body.Data.StateAfter)
			require.Equal(t, e.Version, a.body.Data.Version)
			require.WithinDuration(t, e.Time, a.body.CreatedAt, time.Millisecond)
			require.Equal(t, as[0].body, a.body, "the same body on every attempt")
		}
	}
	require.Zero(t, counter(t, reg, "vaultfleet_webhook_deliveries_total", events.OutcomeDropped), "nothing dropped")
	// The receiver answers before the delivery handler counts the answer.
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Equal(c, float64(len(want)), counter(c, reg, "vaultfleet_webhook_deliveries_total", events.OutcomeDelivered))
	}, 10*time.Second, 20*time.Millisecond, "every delivery counted")
	cancel()
	require.NoError(t, <-relayDone)
}

// TestDeliveryOfAV1PayloadStillReadsTheStream: tasks enqueued before the
// upgrade name their event by id only; they are still delivered from the
// stream.
func TestDeliveryOfAV1PayloadStillReadsTheStream(t *testing.T) {
	t.Parallel()
	var got []byte
	b := newDeliveryBundle(t, func(w http.ResponseWriter, r *http.Request) {
		got = mustRead(r)
		w.WriteHeader(http.StatusOK)
	})
	task, err := tasks.NewWebhookTask(b.eventID, "sub")
	require.NoError(t, err)
	p, err := tasks.ParseWebhookPayload(task.Payload())
	require.NoError(t, err)
	require.Equal(t, 1, p.V)
	require.Nil(t, p.Event)
	require.NoError(t, b.h.ProcessTask(context.Background(), task))
	require.Contains(t, string(got), `"connection_id":"crm+pipedrive"`)
}
