package state

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// rotation is a store written under k1, and the same data opened with
// other keyrings.
type rotation struct {
	*storeBundle
	k2 string
}

func setupRotation(t *testing.T) *rotation {
	t.Helper()
	return &rotation{storeBundle: setupStore(t, func(c *Config) { c.Shards = 2 }), k2: secrets.NewKey("k2")}
}

// setupPrivateRotation is setupRotation on a Redis of its own, so that its
// long runs never wait for one of the shared server's 16 databases.
func setupPrivateRotation(t *testing.T, shards int) *rotation {
	t.Helper()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	spec := secrets.NewKey("k1")
	keys, err := secrets.ParseKeyring(spec)
	require.NoError(t, err)
	clock := &testClock{now: storeT0}
	cfg := Config{Client: rdb, Catalog: storeCatalog(t), Keys: keys, NowFunc: clock.Now, Shards: shards}
	s, err := New(cfg)
	require.NoError(t, err)
	return &rotation{storeBundle: &storeBundle{store: s, rdb: rdb, clock: clock, keys: keys, keySpec: spec, cfg: cfg},
		k2: secrets.NewKey("k2")}
}

// with opens the same Redis with the keyring spec.
func (r *rotation) with(t *testing.T, spec string) *Store {
	t.Helper()
	keys, err := secrets.ParseKeyring(spec)
	require.NoError(t, err)
	cfg := r.cfg
	cfg.Keys = keys
	s, err := New(cfg)
	require.NoError(t, err)
	return s
}

func (r *rotation) rotated(t *testing.T) *Store { return r.with(t, r.k2+","+r.keySpec) }
func (r *rotation) newOnly(t *testing.T) *Store { return r.with(t, r.k2) }

// TestUnreadableRecordDegradesToThatRecord: the old key is gone without a
// reseal. Listings return every record, the unreadable ones marked; Get
// says why and still carries the facts; a full credentials replacement and
// a delete work; every write that needs the old plaintext is refused with
// ErrUnreadable, never with a transient error.
func TestUnreadableRecordDegradesToThatRecord(t *testing.T) {
	t.Parallel()
	r := setupRotation(t)
	ctx := context.Background()
	const secret = "old-secret-value-0123"
	// Written under k1.
	old := []Ref{{ConsumerID: "c1", ConnectionID: "hris+bamboohr"}, {ConsumerID: "c1", ConnectionID: "ticketing+zendesk"},
		{ConsumerID: "c2", ConnectionID: "hris+bamboohr"}, {ConsumerID: "c3", ConnectionID: "hris+bamboohr"}}
	_, err := r.store.Put(ctx, old[0], bambooInput(secret), 0)
	require.NoError(t, err)
	c, err := r.store.Get(ctx, old[0])
	require.NoError(t, err)
	ch, err := r.store.ApplyVerdict(ctx, old[0], c.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	_, err = r.store.Put(ctx, old[1], Input{Credentials: map[string]string{"username": "u", "password": secret}}, 0)
	require.NoError(t, err)
	for _, ref := range old[2:] {
		_, err = r.store.Put(ctx, ref, bambooInput(secret), 0)
		require.NoError(t, err)
	}
	// Written under k2 while k1 still decrypts.
	fresh := Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"}
	_, err = r.rotated(t).Put(ctx, fresh, sfInput("at-new", "rt-new", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)

	s := r.newOnly(t)

	// Listings: every record, the unreadable ones marked, nothing fails.
	conns, err := s.ListConsumer(ctx, "c1")
	require.NoError(t, err)
	require.Len(t, conns, 3)
	marks := map[string]bool{}
	for _, c := range conns {
		marks[c.ID] = c.Unreadable
	}
	require.Equal(t, map[string]bool{"hris+bamboohr": true, "ticketing+zendesk": true, "crm+salesforce": false}, marks)
	for _, c := range conns {
		if c.ID == "hris+bamboohr" {
			require.Equal(t, Callable, c.State, "the stored state, not one derived from missing credentials")
			require.Equal(t, HealthOK, c.Health)
			require.Equal(t, "k1", c.CredentialsKeyID)
			require.Equal(t, Credentials{}, c.Credentials)
			require.Equal(t, "acme", c.Settings["subdomain"])
		}
		if c.ID == "crm+salesforce" {
			require.Equal(t, "rt-new", c.Credentials.RefreshToken)
			require.Equal(t, "k2", c.CredentialsKeyID)
		}
	}
	page, next, err := s.List(ctx, Filter{}, "", 3)
	require.NoError(t, err, "the first page of the fleet listing")
	require.Len(t, page, 3)
	all := page
	for next != "" {
		page, next, err = s.List(ctx, Filter{}, next, 3)
		require.NoError(t, err)
		all = append(all, page...)
	}
	require.Len(t, all, 5)
	unreadable := 0
	for _, c := range all {
		if c.Unreadable {
			unreadable++
		}
	}
	require.Equal(t, 4, unreadable)

	// Get: a typed error naming the key id, with the facts, no secret.
	_, err = s.Get(ctx, old[0])
	require.ErrorIs(t, err, ErrUnreadable)
	require.ErrorIs(t, err, secrets.ErrUnknownKey)
	require.Contains(t, err.Error(), `"k1"`)
	require.NotContains(t, err.Error(), secret)
	var ue *UnreadableError
	require.ErrorAs(t, err, &ue)
	require.Equal(t, old[0], ue.Ref)
	require.Equal(t, "k1", ue.KeyID)
	require.True(t, ue.Connection.Unreadable)
	require.Equal(t, Callable, ue.Connection.State)

	// Writes that need the old plaintext are refused, and not as a
	// transient error or as contention.
	off := false
	for name, write := range map[string]func() error{
		"PatchEnabled": func() error { _, err := s.Patch(ctx, old[0], Input{Enabled: &off}, 0); return err },
		"PatchMerge": func() error {
			_, err := s.Patch(ctx, old[1], Input{Credentials: map[string]string{"password": "p2"}}, 0)
			return err
		},
		"PutSettingsOnly": func() error {
			_, err := s.Put(ctx, old[0], Input{Settings: map[string]string{"subdomain": "other"}}, 0)
			return err
		},
		"Verdict": func() error {
			_, err := s.ApplyVerdict(ctx, old[0], c.Revision, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected})
			return err
		},
		"Transient": func() error { _, err := s.RecordTransient(ctx, old[0], c.Revision, "HTTP 503"); return err },
		"Tokens": func() error {
			_, err := s.StoreTokens(ctx, old[0], "", Tokens{AccessToken: "x"})
			return err
		},
		"Reseal": func() error { _, err := s.Reseal(ctx, old[0]); return err },
	} {
		err := write()
		require.ErrorIs(t, err, ErrUnreadable, name)
		require.NotErrorIs(t, err, ErrContention, name)
		require.False(t, Unavailable(err), name)
	}
	got, err := r.rotated(t).Get(ctx, old[0])
	require.NoError(t, err)
	require.Equal(t, secret, got.Credentials.APIKey, "nothing was written over the old value")
	require.Equal(t, c.Version+1, got.Version)

	// PUT with new credentials replaces them without the old plaintext.
	ch, err = s.Put(ctx, old[0], bambooInput("brand-new-key"), 0)
	require.NoError(t, err)
	require.False(t, ch.After.Unreadable)
	require.Equal(t, "k2", ch.After.CredentialsKeyID)
	require.Greater(t, ch.After.Revision, got.Revision, "a new credentials revision: the old verdict no longer applies")
	require.Equal(t, Added, ch.After.State)
	got, err = s.Get(ctx, old[0])
	require.NoError(t, err)
	require.Equal(t, "brand-new-key", got.Credentials.APIKey)
	require.Equal(t, Added, got.State)

	// PUT with credentials that clear every field drops the value.
	ch, err = s.Put(ctx, old[1], Input{Credentials: map[string]string{}}, 0)
	require.NoError(t, err)
	got, err = s.Get(ctx, old[1])
	require.NoError(t, err)
	require.False(t, got.Unreadable)
	require.Empty(t, got.CredentialsKeyID)
	require.Equal(t, Added, got.State)

	// DELETE works, and the indexes and counts follow.
	_, err = s.Delete(ctx, old[2], 0)
	require.NoError(t, err)
	_, err = s.Get(ctx, old[2])
	require.ErrorIs(t, err, ErrNotFound)
	counts, err := s.Counts(ctx)
	require.NoError(t, err)
	var total int64
	for _, n := range counts {
		total += n
	}
	require.Equal(t, int64(4), total)
	conns, err = s.ListConsumer(ctx, "c2")
	require.NoError(t, err)
	require.Empty(t, conns)
}

// TestResealAllThenRetireTheOldKey is the rotation of the README: run with
// new,old; reseal; run with new only: every record opens. A second reseal
// rewrites nothing.
func TestResealAllThenRetireTheOldKey(t *testing.T) {
	t.Parallel()
	r := setupPrivateRotation(t, 1)
	ctx := context.Background()
	const n = 1100 // more than two pages of the one shard
	want := map[Ref]string{}
	for i := range n {
		ref := Ref{ConsumerID: fmt.Sprintf("u%04d", i), ConnectionID: "hris+bamboohr"}
		key := fmt.Sprintf("key-%d", i)
		_, err := r.store.Put(ctx, ref, bambooInput(key), 0)
		require.NoError(t, err)
		want[ref] = key
	}
	noCreds := Ref{ConsumerID: "nocreds", ConnectionID: "hris+bamboohr"}
	_, err := r.store.Put(ctx, noCreds, Input{Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)

	rotated := r.rotated(t)
	var reports []ResealProgress
	p, err := rotated.ResealAll(ctx, func(p ResealProgress) { reports = append(reports, p) })
	require.NoError(t, err)
	require.Equal(t, n+1, p.Scanned)
	require.Equal(t, n, p.Resealed)
	require.Equal(t, 1, p.Current)
	require.Empty(t, p.Unreadable)
	require.Empty(t, p.Failed)
	require.Greater(t, len(reports), 2, "progress after every page")
	require.Equal(t, p.Scanned, reports[len(reports)-1].Scanned)

	s := r.newOnly(t)
	for ref, key := range want {
		c, err := s.Get(ctx, ref)
		require.NoError(t, err, ref.String())
		require.Equal(t, key, c.Credentials.APIKey)
		require.Equal(t, "k2", c.CredentialsKeyID)
	}
	evs, err := s.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	require.Len(t, evs, n+1, "a reseal makes no event")

	// Run again: idempotent, nothing rewritten.
	versions := map[Ref]int64{}
	for ref := range want {
		c, err := s.Get(ctx, ref)
		require.NoError(t, err)
		versions[ref] = c.Version
	}
	p, err = rotated.ResealAll(ctx, nil)
	require.NoError(t, err)
	require.Equal(t, ResealProgress{Shard: 0, Shards: 1, Scanned: n + 1, Current: n + 1}, p)
	for ref := range want {
		c, err := s.Get(ctx, ref)
		require.NoError(t, err)
		require.Equal(t, versions[ref], c.Version, "a second reseal writes nothing")
	}
}

// TestResealAllReportsUnreadable: a record no key of the ring opens is
// listed (id only) and the walk goes on.
func TestResealAllReportsUnreadable(t *testing.T) {
	t.Parallel()
	r := setupRotation(t)
	ctx := context.Background()
	lost := Ref{ConsumerID: "lost", ConnectionID: "hris+bamboohr"}
	_, err := r.store.Put(ctx, lost, bambooInput("secret-of-a-lost-key"), 0)
	require.NoError(t, err)
	// k0 sealed the next one, and k0 is in no ring from here on.
	k0 := r.with(t, secrets.NewKey("k0"))
	gone := Ref{ConsumerID: "gone", ConnectionID: "hris+bamboohr"}
	_, err = k0.Put(ctx, gone, bambooInput("another"), 0)
	require.NoError(t, err)

	p, err := r.rotated(t).ResealAll(ctx, nil)
	require.NoError(t, err)
	require.Equal(t, 2, p.Scanned)
	require.Equal(t, 1, p.Resealed)
	require.Equal(t, []Ref{gone}, p.Unreadable)
	require.Empty(t, p.Failed)
}

// TestResealAllConcurrentWithWrites: consumers and the fleet keep writing
// while the reseal runs; every last write survives and every record ends
// under the new key.
func TestResealAllConcurrentWithWrites(t *testing.T) {
	t.Parallel()
	r := setupPrivateRotation(t, 2)
	ctx := context.Background()
	const n = 400
	refs := make([]Ref, n)
	for i := range refs {
		refs[i] = Ref{ConsumerID: fmt.Sprintf("w%03d", i), ConnectionID: "hris+bamboohr"}
		_, err := r.store.Put(ctx, refs[i], bambooInput("v0"), 0)
		require.NoError(t, err)
	}
	rotated := r.rotated(t)
	var mu sync.Mutex
	last := map[Ref]string{}
	var wg sync.WaitGroup
	var writes atomic.Int64
	var writeErr error
	stop := make(chan struct{})
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ref := refs[(i*7+w*101)%n]
				val := fmt.Sprintf("w%d-%d", w, i)
				mu.Lock() // one writer per record value at a time, so "last" is known
				_, err := rotated.Put(ctx, ref, bambooInput(val), 0)
				if err == nil {
					last[ref] = val
				} else if writeErr == nil {
					writeErr = err
				}
				mu.Unlock()
				writes.Add(1)
			}
		})
	}
	p, err := rotated.ResealAll(ctx, nil)
	close(stop)
	wg.Wait()
	require.NoError(t, err)
	require.NoError(t, writeErr)
	require.Positive(t, writes.Load())
	require.Empty(t, p.Failed)
	require.Empty(t, p.Unreadable)
	require.Equal(t, n, p.Scanned)
	require.Equal(t, n, p.Resealed+p.Current)

	s := r.newOnly(t)
	for _, ref := range refs {
		c, err := s.Get(ctx, ref)
		require.NoError(t, err, "%s readable with the new key only", ref)
		want, ok := last[ref]
		if !ok {
			want = "v0"
		}
		require.Equal(t, want, c.Credentials.APIKey, "%s: the last write survives", ref)
	}
}

// evalHook cancels ctx right after the write script committed, and fails
// the first failXAdds XADDs, as a Redis Cluster hiccup would.
type evalHook struct {
	cancel    context.CancelFunc
	failXAdds atomic.Int32
	xadds     atomic.Int32
}

func (h *evalHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *evalHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *evalHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "xadd" {
			h.xadds.Add(1)
			if h.failXAdds.Add(-1) >= 0 {
				err := errors.New("CLUSTERDOWN the cluster is down (test)")
				cmd.SetErr(err)
				return err
			}
		}
		err := next(ctx, cmd)
		if (cmd.Name() == "evalsha" || cmd.Name() == "eval") && err == nil && h.cancel != nil {
			h.cancel()
		}
		return err
	}
}

// TestClusterEventAppendOutlivesTheCaller: on Redis Cluster the event is
// appended after the write; a caller whose context ends right after the
// commit (a client that disconnected) must not lose it, and a failing
// XADD is retried. When every attempt fails the loss is counted.
func TestClusterEventAppendOutlivesTheCaller(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	// A stream of its own: the test reads the whole stream back.
	b := setupStore(t, func(c *Config) { c.Registerer, c.EventStream = reg, "events:"+t.Name() })
	b.store.cluster = true // the stream key is left out of the script, as on a cluster
	hook := &evalHook{}
	b.rdb.AddHook(hook)

	ctx, cancel := context.WithCancel(context.Background())
	hook.cancel = cancel
	hook.failXAdds.Store(2)
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	require.Error(t, ctx.Err(), "the caller's context ended right after the commit")
	require.Len(t, ch.Events, 1)
	require.NotEmpty(t, ch.Events[0].ID, "appended despite the cancelled caller and two failed attempts")
	require.Equal(t, int32(3), hook.xadds.Load())
	evs, err := b.store.ReadEvents(context.Background(), "", 0)
	require.NoError(t, err)
	require.Equal(t, []string{EventCreated}, eventTypes(evs))
	require.Equal(t, ch.Events[0].ID, evs[0].ID)
	require.Zero(t, testutil.ToFloat64(b.store.eventsLost))

	// Every attempt fails: the write stands, the loss is counted.
	hook.cancel = nil
	hook.failXAdds.Store(1000)
	off := false
	ch, err = b.store.Patch(context.Background(), refBamboo, Input{Enabled: &off}, 0)
	require.NoError(t, err)
	require.False(t, ch.After.Enabled)
	require.Empty(t, ch.Events[0].ID)
	require.Equal(t, 1.0, testutil.ToFloat64(b.store.eventsLost))
	n, err := testutil.GatherAndCount(reg, "vaultfleet_events_lost_total")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	evs, err = b.store.ReadEvents(context.Background(), "", 0)
	require.NoError(t, err)
	require.Len(t, evs, 1)
	require.False(t, slices.ContainsFunc(evs, func(e Event) bool { return e.Type == EventDisabled }))
}
