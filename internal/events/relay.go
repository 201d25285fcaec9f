package events

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Defaults of RelayConfig.
const (
	DefaultGroup         = "webhooks"
	DefaultBatch         = 100
	DefaultBlock         = 2 * time.Second
	DefaultClaimIdle     = time.Minute
	DefaultClaimInterval = 30 * time.Second
	DefaultMaxBackoff    = 30 * time.Second
	// DefaultConsumerExpiry is how long a consumer of the group with no
	// pending entries may stay idle before the relay removes it.
	DefaultConsumerExpiry = 24 * time.Hour
)

// Enqueuer enqueues tasks; *asynq.Client is one.
type Enqueuer interface {
	EnqueueContext(ctx context.Context, task *asynq.Task, opts ...asynq.Option) (*asynq.TaskInfo, error)
}

var _ Enqueuer = (*asynq.Client)(nil)

// GroupStream is the event stream as a consumer group reads it;
// *state.EventStream is one.
type GroupStream interface {
	// CreateGroup creates the group (and the stream) unless it exists.
	CreateGroup(ctx context.Context, group, start string) error
	// ReadGroup reads entries after id (">" new ones, waiting up to block;
	// "0" the consumer's own pending ones). state.ErrNoGroup if the group
	// is gone.
	ReadGroup(ctx context.Context, group, consumer, id string, count int64, block time.Duration) ([]state.StreamEntry, error)
	// ClaimIdle takes over entries others left pending for minIdle, from
	// start; it returns the next start, "0-0" at the end.
	ClaimIdle(ctx context.Context, group, consumer string, minIdle time.Duration, start string, count int64) ([]state.StreamEntry, string, error)
	Ack(ctx context.Context, group string, ids ...string) error
	Consumers(ctx context.Context, group string) ([]state.GroupConsumer, error)
	DeleteConsumer(ctx context.Context, group, consumer string) error
}

var _ GroupStream = (*state.EventStream)(nil)

// RelayConfig configures a Relay. Events, Enqueuer and Subscriptions are
// required.
type RelayConfig struct {
	// Events is the event stream the relay follows
	// (state.NewEventStream: the stream the store appends to).
	Events GroupStream
	// Enqueuer enqueues webhook:deliver tasks.
	Enqueuer Enqueuer
	// Subscriptions to relay to. With none, Run still acknowledges every
	// entry, so nothing piles up in the group.
	Subscriptions []Subscription
	// Group is the consumer group. If empty, DefaultGroup.
	Group string
	// StartID is where a newly created group starts: "0" (the default:
	// every entry still in the stream) or "$" (only new entries).
	StartID string
	// Consumer names this relay in the group. If empty,
	// "<hostname>-<pid>-<random>".
	Consumer string
	// Batch is how many entries one read takes. If zero, DefaultBatch.
	Batch int64
	// Block is how long one read waits for new entries (and bounds how
	// long Run takes to return after ctx is done). If zero, DefaultBlock.
	Block time.Duration
	// ClaimIdle is how long an entry read by another relay may stay
	// unacknowledged before this one claims it (XAUTOCLAIM). If zero,
	// DefaultClaimIdle.
	ClaimIdle time.Duration
	// ClaimInterval is how often pending entries of others are claimed.
	// If zero, DefaultClaimInterval.
	ClaimInterval time.Duration
	// ConsumerExpiry: consumers of the group with nothing pending and idle
	// for longer are deleted. If zero, DefaultConsumerExpiry.
	ConsumerExpiry time.Duration
	// MaxBackoff caps the wait after a Redis or enqueue error. If zero,
	// DefaultMaxBackoff.
	MaxBackoff time.Duration
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer receives the relay metrics. If nil, not exported.
	Registerer prometheus.Registerer
}

// Relay follows the event stream in a consumer group and turns each entry
// into one webhook:deliver task per matching subscription. An entry is
// acknowledged only after all its tasks are enqueued (a task id conflict
// means already enqueued), and entries a dead relay read but never
// acknowledged are claimed after ClaimIdle: delivery is at least once,
// and the task ids make it once per event and subscription while the task
// lives.
type Relay struct {
	cfg      RelayConfig
	log      *slog.Logger
	enqueued *prometheus.CounterVec
	entries  prometheus.Counter
	errors   prometheus.Counter
}

// NewRelay validates cfg and returns a Relay.
func NewRelay(cfg RelayConfig) (*Relay, error) {
	if cfg.Events == nil {
		return nil, errors.New("events: RelayConfig.Events is required")
	}
	if cfg.Enqueuer == nil {
		return nil, errors.New("events: RelayConfig.Enqueuer is required")
	}
	if cfg.Group == "" {
		cfg.Group = DefaultGroup
	}
	if cfg.StartID == "" {
		cfg.StartID = "0"
	}
	if cfg.Consumer == "" {
		cfg.Consumer = consumerName()
	}
	if cfg.Batch <= 0 {
		cfg.Batch = DefaultBatch
	}
	if cfg.Block <= 0 {
		cfg.Block = DefaultBlock
	}
	if cfg.ClaimIdle <= 0 {
		cfg.ClaimIdle = DefaultClaimIdle
	}
	if cfg.ClaimInterval <= 0 {
		cfg.ClaimInterval = DefaultClaimInterval
	}
	if cfg.ConsumerExpiry <= 0 {
		cfg.ConsumerExpiry = DefaultConsumerExpiry
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	seen := map[string]bool{}
	for _, s := range cfg.Subscriptions {
		if !subscriptionNameRE.MatchString(s.Name) || seen[s.Name] {
			return nil, fmt.Errorf("events: subscription name %q invalid or listed twice", s.Name)
		}
		seen[s.Name] = true
	}
	r := &Relay{
		cfg: cfg,
		log: cfg.Logger.With(slog.String("component", "webhook_relay"), slog.String("consumer", cfg.Consumer)),
		enqueued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vaultfleet_webhook_relay_tasks_total",
			Help: "webhook:deliver tasks the relay enqueued (outcome enqueued, duplicate).",
		}, []string{"outcome"}),
		entries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vaultfleet_webhook_relay_entries_total",
			Help: "Event stream entries the relay acknowledged.",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vaultfleet_webhook_relay_errors_total",
			Help: "Redis or enqueue errors the relay backed off on.",
		}),
	}
	for _, c := range []prometheus.Collector{r.enqueued, r.entries, r.errors} {
		if err := cfg.Registerer.Register(c); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Consumer returns the relay's consumer name in the group.
func (r *Relay) Consumer() string { return r.cfg.Consumer }

func consumerName() string {
	host, _ := os.Hostname()
	if host == "" {
		host = "relay"
	}
	b := make([]byte, 4)
	_, _ = crand.Read(b)
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b))
}

// Run relays until ctx is done, then returns nil. Redis and enqueue errors
// are logged and retried with exponential backoff; nothing read is lost,
// since an entry is acknowledged only once its tasks are enqueued.
func (r *Relay) Run(ctx context.Context) error {
	var failures int
	groupReady := false
	var nextClaim time.Time
	for ctx.Err() == nil {
		err := func() error {
			if !groupReady {
				if err := r.ensureGroup(ctx); err != nil {
					return err
				}
				groupReady = true
			}
			if now := time.Now(); !now.Before(nextClaim) {
				if err := r.claim(ctx); err != nil {
					return err
				}
				r.expireConsumers(ctx)
				nextClaim = now.Add(r.cfg.ClaimInterval)
			}
			return r.step(ctx)
		}()
		if err == nil {
			failures = 0
			continue
		}
		if ctx.Err() != nil {
			break
		}
		if errors.Is(err, state.ErrNoGroup) {
			groupReady = false
		}
		failures++
		r.errors.Inc()
		d := backoff(failures, r.cfg.MaxBackoff)
		if failures == 1 || failures%10 == 0 {
			r.log.WarnContext(ctx, "webhook relay: backing off", slog.String("error", err.Error()),
				slog.Int("failures", failures), slog.Duration("backoff", d))
		}
		_ = retry.Sleep(ctx, d) // a cancelled ctx ends the loop above
	}
	return nil
}

// backoff is 100ms doubling up to max, with ±25% jitter.
func backoff(n int, maxD time.Duration) time.Duration {
	return retry.Spread(retry.Exp(n-1, 100*time.Millisecond, maxD), 0.25, rand.Float64())
}

// ensureGroup creates the group (and the stream) if missing.
func (r *Relay) ensureGroup(ctx context.Context) error {
	return r.cfg.Events.CreateGroup(ctx, r.cfg.Group, r.cfg.StartID)
}

// step handles this consumer's own pending entries first (left over from
// a failed enqueue), then reads new ones, blocking up to Block.
func (r *Relay) step(ctx context.Context) error {
	for _, id := range []string{"0", ">"} {
		var block time.Duration
		if id == ">" {
			block = r.cfg.Block
		}
		msgs, err := r.cfg.Events.ReadGroup(ctx, r.cfg.Group, r.cfg.Consumer, id, r.cfg.Batch, block)
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			continue
		}
		return r.handle(ctx, msgs)
	}
	return nil
}

// claim takes over entries other consumers read but did not acknowledge
// within ClaimIdle, and relays them.
func (r *Relay) claim(ctx context.Context) error {
	start := "0-0"
	for {
		msgs, next, err := r.cfg.Events.ClaimIdle(ctx, r.cfg.Group, r.cfg.Consumer, r.cfg.ClaimIdle, start, r.cfg.Batch)
		if err != nil {
			return err
		}
		if len(msgs) > 0 {
			r.log.InfoContext(ctx, "webhook relay: claimed entries of another relay", slog.Int("entries", len(msgs)))
			if err := r.handle(ctx, msgs); err != nil {
				return err
			}
		}
		if next == "0-0" || next == "" {
			return nil
		}
		start = next
	}
}

// expireConsumers deletes consumers with nothing pending that have been
// idle for ConsumerExpiry (relays that went away). Errors are only logged.
func (r *Relay) expireConsumers(ctx context.Context) {
	cs, err := r.cfg.Events.Consumers(ctx, r.cfg.Group)
	if err != nil {
		return
	}
	for _, c := range cs {
		if c.Name == r.cfg.Consumer || c.Pending > 0 || c.Idle < r.cfg.ConsumerExpiry {
			continue
		}
		if err := r.cfg.Events.DeleteConsumer(ctx, r.cfg.Group, c.Name); err == nil {
			r.log.InfoContext(ctx, "webhook relay: removed idle consumer", slog.String("removed", c.Name))
		}
	}
}

// handle enqueues the tasks of msgs in order and acknowledges the entries
// done; on an enqueue error it acknowledges what was done and returns.
func (r *Relay) handle(ctx context.Context, msgs []state.StreamEntry) error {
	var done []string
	var failed error
	for _, m := range msgs {
		if err := r.relay(ctx, m); err != nil {
			failed = err
			break
		}
		done = append(done, m.ID)
	}
	if len(done) > 0 {
		// The acknowledgement must not be lost to a cancelled ctx: the
		// tasks are enqueued already.
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		err := r.cfg.Events.Ack(actx, r.cfg.Group, done...)
		cancel()
		if err != nil {
			return err
		}
		r.entries.Add(float64(len(done)))
	}
	return failed
}

// TaskEvent is the event as a webhook:deliver task carries it.
func TaskEvent(e state.Event) tasks.WebhookEvent {
	return tasks.WebhookEvent{Type: e.Type, ConnectionID: e.ConnectionID, ConsumerID: e.ConsumerID,
		ServiceID: e.ServiceID, UnifiedAPI: e.UnifiedAPI,
		StateBefore: string(e.StateBefore), StateAfter: string(e.StateAfter),
		HealthBefore: string(e.HealthBefore), HealthAfter: string(e.HealthAfter),
		Reason: e.Reason, Version: e.Version, Time: e.Time}
}

// relay enqueues one entry's tasks.
func (r *Relay) relay(ctx context.Context, m state.StreamEntry) error {
	if len(m.Values) == 0 {
		return nil // deleted from the stream meanwhile
	}
	typ, _ := m.Values["type"].(string)
	// The task carries the event, so its delivery does not depend on the
	// stream (capped by MAXLEN) still holding the entry hours later.
	ev, evErr := m.Event()
	for i := range r.cfg.Subscriptions {
		sub := &r.cfg.Subscriptions[i]
		if !sub.Matches(typ) {
			continue
		}
		var t *asynq.Task
		var err error
		if evErr == nil {
			t, err = tasks.NewWebhookEventTask(m.ID, sub.Name, TaskEvent(ev))
		}
		if evErr != nil || err != nil {
			// An entry the store did not write, or one whose fields a
			// v2 payload refuses: name it by id (v1), as before.
			t, err = tasks.NewWebhookTask(m.ID, sub.Name)
		}
		if err != nil {
			// Cannot happen for a stream id and a validated name; log
			// and skip rather than block the stream forever.
			r.log.ErrorContext(ctx, "webhook relay: cannot build task", slog.String("event_id", m.ID),
				slog.String("subscription", sub.Name), slog.String("error", err.Error()))
			continue
		}
		_, err = r.cfg.Enqueuer.EnqueueContext(ctx, t)
		switch {
		case errors.Is(err, asynq.ErrTaskIDConflict):
			r.enqueued.WithLabelValues("duplicate").Inc()
		case err != nil:
			return fmt.Errorf("enqueue %s for %s: %w", m.ID, sub.Name, err)
		default:
			r.enqueued.WithLabelValues("enqueued").Inc()
		}
	}
	return nil
}
