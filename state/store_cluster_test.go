package state

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// clusterStore is a store on the package's local Redis Cluster, its clock
// a minute behind the wall so that first checks are due by Redis TIME.
func clusterStore(t *testing.T, shards int) (*Store, *redis.ClusterClient, *redistest.Cluster) {
	t.Helper()
	c := redistest.StartCluster(t)
	rdb := c.Client(t)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := New(Config{Client: rdb, Catalog: storeCatalog(t), Keys: keys, Shards: shards,
		NowFunc: func() time.Time { return time.Now().Add(-time.Minute) }})
	require.NoError(t, err)
	return st, rdb, c
}

// TestStoreOnCluster runs the store's core flows on a three-master Redis
// Cluster: writes, reads, verdicts, the refresh fence, events (appended
// after the write: the stream is in another slot), consumer deletion,
// and claims of every shard at Redis TIME, shards spread over every
// master.
func TestStoreOnCluster(t *testing.T) {
	st, _, c := clusterStore(t, 16)
	ctx := context.Background()

	owners := map[string]bool{}
	for sh := range st.Shards() {
		owners[c.Owner(t, st.shardKeys(sh).counts())] = true
	}
	require.Len(t, owners, len(c.Addrs), "the shards live on every master")

	const n = 60
	refs := make([]Ref, n)
	for i := range refs {
		refs[i] = Ref{ConsumerID: fmt.Sprintf("cl%03d", i), ConnectionID: "hris+bamboohr"}
		_, err := st.Put(ctx, refs[i], bambooInput(fmt.Sprint("key-", i)), 0)
		require.NoError(t, err)
	}
	got, err := st.Get(ctx, refs[7])
	require.NoError(t, err)
	require.Equal(t, "key-7", got.Credentials.APIKey)
	ch, err := st.ApplyVerdict(ctx, refs[7], got.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	got8, err := st.Get(ctx, refs[8])
	require.NoError(t, err)
	_, err = st.ApplyVerdict(ctx, refs[8], got8.Revision, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)

	// The refresh fence.
	_, err = st.Put(ctx, refSF, sfInput("at", "rt", time.Now().Add(time.Hour)), 0)
	require.NoError(t, err)
	l, err := st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	_, err = st.AcquireRefresh(ctx, refSF, time.Minute)
	require.ErrorIs(t, err, ErrRefreshLocked)
	require.NoError(t, st.ExtendRefresh(ctx, l, 2*time.Minute))
	_, err = st.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	_, err = st.StoreRefreshedTokens(ctx, l, "rt", Tokens{AccessToken: "at2", RefreshToken: "rt2", ExpiresAt: time.Now().Add(2 * time.Hour)})
	require.NoError(t, err)
	require.NoError(t, st.ReleaseRefresh(ctx, l))
	sf, err := st.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, "at2", sf.Credentials.AccessToken)

	// Events: every write's, in order per connection.
	evs, err := st.ReadEvents(ctx, "0", 1000)
	require.NoError(t, err)
	byConn := map[Ref][]string{}
	for _, e := range evs {
		r := Ref{ConsumerID: e.ConsumerID, ConnectionID: e.ConnectionID}
		byConn[r] = append(byConn[r], e.Type)
	}
	require.Len(t, byConn, n+1)
	require.Equal(t, EventCreated, byConn[refs[0]][0])
	require.Contains(t, byConn[refs[7]], EventCallable)
	require.Contains(t, byConn[refs[8]], EventInvalid)

	// Claims of every shard, at Redis TIME: every first check is due (not
	// the two with verdicts: their next check is an interval away).
	claimed := map[Ref]bool{}
	for sh := range st.Shards() {
		cs, err := st.ClaimDue(ctx, IndexCheck, sh, time.Time{}, time.Minute, 1000)
		require.NoError(t, err)
		for _, c := range cs {
			claimed[c.Ref] = true
		}
	}
	require.Len(t, claimed, n+1-2)
	require.False(t, claimed[refs[7]] || claimed[refs[8]])

	// A consumer with its connections goes at once.
	_, err = st.CreateConsumer(ctx, refs[3].ConsumerID, json.RawMessage(`{"name":"x"}`))
	require.NoError(t, err)
	_, err = st.DeleteConsumer(ctx, refs[3].ConsumerID)
	require.NoError(t, err)
	_, err = st.Get(ctx, refs[3])
	require.ErrorIs(t, err, ErrNotFound)
	counts, err := st.Counts(ctx)
	require.NoError(t, err)
	total := int64(0)
	for _, v := range counts {
		total += v
	}
	require.EqualValues(t, n, total)
}

// TestClaimDuringSlotMigration: while the slot of a shard migrates and a
// member's record has already moved, the claim of that shard is refused
// before it moves anything (TRYAGAIN: every key is declared), and once
// the slot has moved the member is claimed.
func TestClaimDuringSlotMigration(t *testing.T) {
	st, _, c := clusterStore(t, 4)
	ctx := context.Background()
	ref := Ref{ConsumerID: "mig1", ConnectionID: "hris+bamboohr"}
	other := Ref{ConsumerID: "mig1", ConnectionID: "crm+salesforce"}
	_, err := st.Put(ctx, ref, bambooInput("k"), 0)
	require.NoError(t, err)
	_, err = st.Put(ctx, other, sfInput("a", "r", time.Now().Add(time.Hour)), 0)
	require.NoError(t, err)
	k := st.keysOf(ref)
	shard := st.ShardOf(ref.ConsumerID)

	m := c.BeginMigration(t, k.record(ref.String()))
	m.Move(k.record(ref.String()))
	_, err = st.ClaimDue(ctx, IndexCheck, shard, time.Time{}, time.Minute, 100)
	require.Error(t, err)
	require.Contains(t, err.Error(), "TRYAGAIN")
	src := c.Node(t, m.Source)
	zs, err := src.ZRangeWithScores(ctx, k.due(IndexCheck), 0, -1).Result()
	require.NoError(t, err)
	require.Len(t, zs, 2)
	for _, z := range zs {
		require.Less(t, z.Score, float64(time.Now().UnixMilli()), "nothing moved to a lease")
	}

	m.Finish()
	cs, err := st.ClaimDue(ctx, IndexCheck, shard, time.Time{}, time.Minute, 100)
	require.NoError(t, err)
	require.Len(t, cs, 2)
}
