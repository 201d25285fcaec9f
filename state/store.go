package state

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// Defaults of Config.
const (
	DefaultShards      = 16
	DefaultPrefix      = "vf"
	DefaultEventStream = "vaultfleet:events"
	DefaultEventMaxLen = 100_000
)

// Config configures a Store. The zero value of every field but Client,
// Catalog and Keys works.
type Config struct {
	// Client is one Redis, a Sentinel failover client or a Cluster client.
	Client redis.UniversalClient
	// AckReplicas is how many replicas must acknowledge a write of
	// refreshed tokens (Redis WAIT) before it counts as stored. Redis
	// replicates asynchronously: in a failover, a write the old master
	// acknowledged can vanish, and with it a rotated refresh token. Zero
	// (the default, right for one Redis) waits for none; with Sentinel,
	// 1. An unacknowledged write is retried (ErrNotReplicated).
	AckReplicas int
	// AckTimeout bounds that wait. If zero, 2s.
	AckTimeout time.Duration
	// Catalog resolves each connection's integration.
	Catalog *catalog.Catalog
	// Keys encrypts credentials at rest.
	Keys *secrets.Keyring
	// Shards splits the fleet-wide indexes. If zero, DefaultShards.
	Shards int
	// Prefix of every key. If empty, DefaultPrefix.
	Prefix string
	// EventStream is the Redis stream that state changes are appended to.
	// If empty, DefaultEventStream.
	EventStream string
	// EventMaxLen caps the stream (MAXLEN ~). If zero, DefaultEventMaxLen.
	EventMaxLen int64
	// NowFunc is the clock. If nil, time.Now.
	NowFunc func() time.Time
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer receives vaultfleet_events_lost_total. If nil, the
	// counter is kept but not exported.
	Registerer prometheus.Registerer
}

// Store keeps connections in Redis with their derived state, their due
// indexes and per-integration-per-state counts, all updated in one atomic
// step with every write.
type Store struct {
	cfg Config
	// cluster: the event stream lives in another slot, so events are
	// appended right after the write instead of inside its script.
	cluster bool
	// tags are the key prefixes of the shards, "vf:{s07}:", made once.
	tags []string
	// eventsLost counts events of committed writes that could not be
	// appended (Redis Cluster only).
	eventsLost prometheus.Counter
}

// Input is what a consumer-side write sets. Nil fields are left alone.
type Input struct {
	Enabled *bool
	// Credentials by catalog field name; an empty value clears the field.
	Credentials map[string]string
	// Settings by name; an empty value clears the setting.
	Settings map[string]string
	// Metadata, if not nil, replaces the connection's metadata: a JSON
	// object of at most MaxMetadataBytes, or null to clear it.
	Metadata json.RawMessage
	// GrantedScopes, with Credentials, records the scopes a provider
	// granted (the connect flow). Credentials written without it leave the
	// granted scopes unknown.
	GrantedScopes []string
}

// MaxMetadataBytes caps the metadata of a connection or a consumer.
const MaxMetadataBytes = 8 << 10

// Tokens is what a token endpoint returned.
type Tokens struct {
	AccessToken string
	// RefreshToken, if empty, keeps the stored one.
	RefreshToken string
	ExpiresAt    time.Time
	IssuedAt     time.Time
}

// Index names a due index.
type Index string

// Due indexes.
const (
	IndexCheck   Index = "check"
	IndexRefresh Index = "refresh"
)

// Filter selects connections for List. Empty fields match everything.
type Filter struct {
	State      State
	ServiceID  string
	UnifiedAPI string
}

// CountKey is one cell of the per-integration-per-state counts.
type CountKey struct {
	ServiceID string
	State     State
}

// Change is the result of a write: the connection before (nil when it was
// created) and after (nil when it was deleted), and the events it appended.
type Change struct {
	Before *Connection
	After  *Connection
	Events []Event
}

// Event is one entry of the state-change stream.
type Event struct {
	// ID is the stream entry id, set when read back.
	ID           string    `json:"id,omitempty"`
	Type         string    `json:"type"`
	ConnectionID string    `json:"connection_id"`
	ConsumerID   string    `json:"consumer_id"`
	ServiceID    string    `json:"service_id"`
	UnifiedAPI   string    `json:"unified_api"`
	StateBefore  State     `json:"state_before,omitempty"`
	StateAfter   State     `json:"state_after,omitempty"`
	HealthBefore Health    `json:"health_before,omitempty"`
	HealthAfter  Health    `json:"health_after,omitempty"`
	Reason       string    `json:"reason,omitempty"`
	Version      int64     `json:"version"`
	Time         time.Time `json:"time"`
}

// Event types, as Apideck Vault names them.
const (
	EventCreated               = "vault.connection.created"
	EventUpdated               = "vault.connection.updated"
	EventCallable              = "vault.connection.callable"
	EventInvalid               = "vault.connection.invalid"
	EventDisabled              = "vault.connection.disabled"
	EventDeleted               = "vault.connection.deleted"
	EventRevoked               = "vault.connection.revoked"
	EventTokenRefreshFailed    = "vault.connection.token_refresh.failed"
	EventTokenRefreshRecovered = "vault.connection.token_refresh.recovered"
	EventDownstreamDegraded    = "vault.connection.downstream.degraded"
	EventDownstreamRecovered   = "vault.connection.downstream.recovered"
)

// EventTypes returns every event type (a fresh slice).
func EventTypes() []string {
	return []string{EventCreated, EventUpdated, EventCallable, EventInvalid,
		EventDisabled, EventDeleted, EventRevoked, EventTokenRefreshFailed,
		EventTokenRefreshRecovered, EventDownstreamDegraded, EventDownstreamRecovered}
}

// New validates cfg, applies defaults and returns a Store.
func New(cfg Config) (*Store, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	_, cluster := cfg.Client.(*redis.ClusterClient)
	s := &Store{cfg: cfg, cluster: cluster, tags: shardTags(cfg.Prefix, cfg.Shards),
		eventsLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vaultfleet_events_lost_total",
			Help: "Events of committed writes that could not be appended to the event stream after retries (Redis Cluster mode, where the append follows the write).",
		})}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(s.eventsLost); err != nil {
			return nil, fmt.Errorf("state: register metrics: %w", err)
		}
	}
	return s, nil
}

// Shards returns the number of index shards.
func (s *Store) Shards() int { return s.cfg.Shards }

// --- reads (List, ListConsumer and Counts: store_read.go; events:
// store_events.go, events_latest.go) ---

// Get returns one connection, or ErrNotFound. When its credentials cannot
// be opened (sealed with a key no longer in the keyring) the error is an
// *UnreadableError (errors.Is ErrUnreadable) whose Connection holds the
// non-secret facts, marked Unreadable.
func (s *Store) Get(ctx context.Context, ref Ref) (*Connection, error) {
	if err := validateRef(ref); err != nil {
		return nil, err
	}
	c, err := s.read(ctx, ref)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, ErrNotFound
	}
	return c, nil
}

// --- consumer-side writes ---

// Put adds a connection or replaces its enabled flag, credentials and
// settings. ifVersion > 0 requires the stored version to match
// (ErrVersionConflict). The service id must be in the catalog with this
// unified API (catalog.ErrUnknownIntegration) and settings must pass
// ValidateSettings. A new connection is enabled unless in.Enabled says no.
// Over credentials that cannot be opened only a Put that sets
// in.Credentials (a full replacement) goes through; any other consumer or
// fleet write of such a record returns ErrUnreadable, while Delete works.
func (s *Store) Put(ctx context.Context, ref Ref, in Input, ifVersion int64) (Change, error) {
	return s.consumerWrite(ctx, ref, in, ifVersion, modePut)
}

// Patch changes the fields in set (nil ones are kept) of an existing
// connection (ErrNotFound otherwise). ifVersion as for Put.
func (s *Store) Patch(ctx context.Context, ref Ref, in Input, ifVersion int64) (Change, error) {
	return s.consumerWrite(ctx, ref, in, ifVersion, modePatch)
}

// Delete removes a connection and its index entries (it becomes
// `available`). ifVersion as for Put.
func (s *Store) Delete(ctx context.Context, ref Ref, ifVersion int64) (Change, error) {
	return s.delete(ctx, ref, ifVersion)
}

// --- fleet-side writes ---

// ApplyVerdict records a definitive result computed for the credentials
// revision rev. If the connection's revision is no longer rev the write is
// refused with ErrStale. An invalid verdict for an integration with
// ConfirmInvalid > 0 is held in Confirmation until enough invalid results
// arrive; a valid one clears Confirmation and Transient.
func (s *Store) ApplyVerdict(ctx context.Context, ref Ref, rev int64, v Verdict) (Change, error) {
	return s.applyVerdict(ctx, ref, nil, rev, v)
}

// ApplyVerdictFrom is ApplyVerdict for the credentials revision of seen,
// the connection as the caller read it (Get): when nothing was written
// since, it saves the store a read; otherwise it reads again, exactly as
// ApplyVerdict does (ErrStale when the revision moved).
func (s *Store) ApplyVerdictFrom(ctx context.Context, seen *Connection, v Verdict) (Change, error) {
	if seen == nil {
		return Change{}, &FieldError{Field: "seen", Msg: "nil connection"}
	}
	return s.applyVerdict(ctx, seen.Ref(), seen, seen.Revision, v)
}

// RecordTransient notes a transient failure (provider trouble) for rev
// without changing the state; ErrStale if the revision moved.
func (s *Store) RecordTransient(ctx context.Context, ref Ref, rev int64, msg string) (Change, error) {
	return s.recordTransient(ctx, ref, rev, msg, false)
}

// RecordMisconfigured notes a failed check that is the consumer's own
// doing, not the provider's (a host from its settings that does not
// resolve or refuses connections, a redirect the catalog refuses): like
// RecordTransient the state is kept, but the health is misconfigured and
// no downstream.degraded event is sent (the provider is fine). ErrStale if
// the revision moved.
func (s *Store) RecordMisconfigured(ctx context.Context, ref Ref, rev int64, msg string) (Change, error) {
	return s.recordTransient(ctx, ref, rev, msg, true)
}

// StoreTokens persists refreshed tokens. usedRefreshToken is the refresh
// token the exchange was made with: if the stored one differs, another
// refresh or the consumer changed it and the write is refused (ErrStale).
// An empty t.RefreshToken keeps the stored one. Clears Refresh failures.
func (s *Store) StoreTokens(ctx context.Context, ref Ref, usedRefreshToken string, t Tokens) (Change, error) {
	return s.storeTokens(ctx, ref, usedRefreshToken, t, nil)
}

// StoreRefreshedTokens is StoreTokens for the tokens of an exchange begun
// with lease (BeginExchange): the write is refused with ErrFenced unless
// the exchange intent is still the lease's, and it clears the intent in
// the same atomic step. The lease itself may have lapsed meanwhile (a
// slow Redis): nobody else exchanges while our intent stands.
func (s *Store) StoreRefreshedTokens(ctx context.Context, lease *RefreshLease, usedRefreshToken string, t Tokens) (Change, error) {
	return s.storeTokens(ctx, lease.ref, usedRefreshToken, t, &fence{lease: lease})
}

// RevokeRefresh applies an invalid verdict about a refresh token (seen's
// current one) under lease: refused with ErrFenced unless both the lease
// and the exchange intent are still ours; clears the intent with the
// write. The verdict records the token's lineage, so that tokens later
// stored from that same lineage void it.
func (s *Store) RevokeRefresh(ctx context.Context, lease *RefreshLease, seen *Connection, v Verdict) (Change, error) {
	if seen == nil || seen.Ref() != lease.ref {
		return Change{}, &FieldError{Field: "seen", Msg: "not the lease's connection"}
	}
	v.Outcome, v.Lineage = OutcomeInvalid, Lineage(seen.Credentials.RefreshToken)
	return s.applyVerdictFenced(ctx, lease.ref, seen, seen.Revision, v, &fence{lease: lease, needLock: true})
}

// RecordRefreshFailure notes a transient refresh failure (health
// pending_refresh, one token_refresh.failed event per episode).
func (s *Store) RecordRefreshFailure(ctx context.Context, ref Ref, usedRefreshToken string, msg string) (Change, error) {
	return s.recordRefreshFailure(ctx, ref, usedRefreshToken, msg)
}

// --- scheduling ---

// ClaimDue atomically takes up to max members of one shard of idx whose due
// time is at or before now and pushes them to now+lease, so that a replica
// claiming at the same time gets other members, and a claim whose enqueue
// never happened is due again after the lease. It returns the refs with the
// due time each was claimed at. A zero now means the Redis server's TIME,
// so that replicas with skewed clocks agree on leases; a test clock may
// pass its own now.
func (s *Store) ClaimDue(ctx context.Context, idx Index, shard int, now time.Time, lease time.Duration, max int) ([]Claim, error) {
	return s.claimDue(ctx, idx, shard, now, lease, max)
}

// OldestDue returns the earliest due time in idx across all shards that is
// at or before now, excluding leased members; ok is false if none.
func (s *Store) OldestDue(ctx context.Context, idx Index, now time.Time) (t time.Time, ok bool, err error) {
	return s.oldestDue(ctx, idx, now)
}

// Claim is a due member taken by ClaimDue.
type Claim struct {
	Ref Ref
	// Due is the due time the member had when claimed.
	Due time.Time
	// Lease is the score it was pushed to.
	Lease time.Time
	// At is the time of the claim: the now given to ClaimDue, or the Redis
	// server's TIME.
	At time.Time
	// ServiceID and State are read from the record in the same atomic
	// step, so the scheduler can pick the interval without another read.
	ServiceID string
	State     State
}
