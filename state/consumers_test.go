package state

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestConsumerRecord(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()

	_, err := b.store.GetConsumer(ctx, "cr1")
	require.ErrorIs(t, err, ErrConsumerNotFound)
	_, err = b.store.UpdateConsumer(ctx, "cr1", json.RawMessage(`{"email":"a@b.c"}`))
	require.ErrorIs(t, err, ErrConsumerNotFound)

	c, err := b.store.CreateConsumer(ctx, "cr1", json.RawMessage(`{ "account_name": "Acme" }`))
	require.NoError(t, err)
	require.JSONEq(t, `{"account_name":"Acme"}`, string(c.Metadata))
	require.Equal(t, storeT0.UnixMilli(), c.CreatedAt.UnixMilli())
	_, err = b.store.CreateConsumer(ctx, "cr1", nil)
	require.ErrorIs(t, err, ErrConsumerExists)

	b.clock.Advance(time.Minute)
	c, err = b.store.UpdateConsumer(ctx, "cr1", json.RawMessage(`{"email":"a@b.c"}`))
	require.NoError(t, err)
	require.JSONEq(t, `{"email":"a@b.c"}`, string(c.Metadata))
	require.Equal(t, storeT0.UnixMilli(), c.CreatedAt.UnixMilli())
	require.Equal(t, storeT0.Add(time.Minute).UnixMilli(), c.ModifiedAt.UnixMilli())
	got, err := b.store.GetConsumer(ctx, "cr1")
	require.NoError(t, err)
	require.Equal(t, c, got)

	created, err := b.store.EnsureConsumer(ctx, "cr1")
	require.NoError(t, err)
	require.False(t, created, "an existing record is left alone")
	created, err = b.store.EnsureConsumer(ctx, "cr2")
	require.NoError(t, err)
	require.True(t, created)

	_, err = b.store.CreateConsumer(ctx, "cr3", json.RawMessage(`[1]`))
	var fe *FieldError
	require.ErrorAs(t, err, &fe)
	require.Equal(t, "metadata", fe.Field)
}

func TestListConsumersWalksEveryShardOnceWithPrefix(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	want := map[string]bool{}
	for i := range 23 {
		id := fmt.Sprintf("lc-%02d", i)
		_, err := b.store.CreateConsumer(ctx, id, nil)
		require.NoError(t, err)
		want[id] = true
	}
	for i := range 5 {
		_, err := b.store.CreateConsumer(ctx, fmt.Sprintf("other-%d", i), nil)
		require.NoError(t, err)
	}
	seen := map[string]bool{}
	cursor, pages := "", 0
	for {
		page, next, err := b.store.ListConsumers(ctx, "lc-", cursor, 4)
		require.NoError(t, err)
		require.LessOrEqual(t, len(page), 4)
		pages++
		for _, c := range page {
			require.False(t, seen[c.ID], "listed twice: %s", c.ID)
			seen[c.ID] = true
		}
		if next == "" {
			break
		}
		cursor = next
	}
	require.Equal(t, want, seen)
	require.GreaterOrEqual(t, pages, 6)

	_, _, err := b.store.ListConsumers(ctx, "", "bm90LWEtY3Vyc29y", 4)
	var fe *FieldError
	require.ErrorAs(t, err, &fe)
}

func TestDeleteConsumerRemovesConnectionsAtomically(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	const cid = "del-1"
	_, err := b.store.CreateConsumer(ctx, cid, json.RawMessage(`{"user_name":"x"}`))
	require.NoError(t, err)
	_, err = b.store.Put(ctx, Ref{ConsumerID: cid, ConnectionID: "hris+bamboohr"}, bambooInput("k1"), 0)
	require.NoError(t, err)
	_, err = b.store.Put(ctx, Ref{ConsumerID: cid, ConnectionID: "crm+salesforce"},
		sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	// A neighbour in the same shard keeps everything.
	other := "del-2"
	_, err = b.store.Put(ctx, Ref{ConsumerID: other, ConnectionID: "hris+bamboohr"}, bambooInput("k2"), 0)
	require.NoError(t, err)
	before, err := b.store.ReadEvents(ctx, "0", 1000)
	require.NoError(t, err)

	changes, err := b.store.DeleteConsumer(ctx, cid)
	require.NoError(t, err)
	require.Len(t, changes, 2)
	for _, ch := range changes {
		require.Nil(t, ch.After)
		require.Len(t, ch.Events, 1)
		require.Equal(t, EventDeleted, ch.Events[0].Type)
		require.NotEmpty(t, ch.Events[0].ID, "the stream id of the appended event")
	}
	after, err := b.store.ReadEvents(ctx, before[len(before)-1].ID, 1000)
	require.NoError(t, err)
	require.Len(t, after, 2)
	for _, e := range after {
		require.Equal(t, EventDeleted, e.Type)
		require.Equal(t, cid, e.ConsumerID)
	}

	// Nothing of the consumer is left: no record, index entry or count.
	keys, err := b.rdb.Keys(ctx, "*"+cid+"*").Result()
	require.NoError(t, err)
	require.Empty(t, keys)
	for _, k := range []string{"all", "due:check", "due:refresh", "consumers", "svc:bamboohr", "svc:salesforce",
		"st:added", "st:callable"} {
		key := b.store.keysOf(Ref{ConsumerID: cid}).tag + k
		members, err := b.rdb.ZRange(ctx, key, 0, -1).Result()
		require.NoError(t, err)
		for _, m := range members {
			require.NotContains(t, m, cid, "index %s", k)
		}
	}
	counts, err := b.store.Counts(ctx)
	require.NoError(t, err)
	require.Equal(t, map[CountKey]int64{{ServiceID: "bamboohr", State: Added}: 1}, counts)
	_, err = b.store.Get(ctx, Ref{ConsumerID: other, ConnectionID: "hris+bamboohr"})
	require.NoError(t, err)
	page, _, err := b.store.ListConsumers(ctx, "del-", "", 10)
	require.NoError(t, err)
	require.Empty(t, page)

	_, err = b.store.DeleteConsumer(ctx, cid)
	require.ErrorIs(t, err, ErrConsumerNotFound)
	// Connections without a record are a consumer too.
	changes, err = b.store.DeleteConsumer(ctx, other)
	require.NoError(t, err)
	require.Len(t, changes, 1)
}

func TestConnectionMetadata(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	in := bambooInput("k")
	in.Metadata = json.RawMessage(`{"team": "blue"}`)
	_, err := b.store.Put(ctx, refBamboo, in, 0)
	require.NoError(t, err)
	c, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.JSONEq(t, `{"team":"blue"}`, string(c.Metadata))

	ch, err := b.store.Patch(ctx, refBamboo, Input{Metadata: json.RawMessage(`{"team":"red"}`)}, 0)
	require.NoError(t, err)
	require.Equal(t, c.Version+1, ch.After.Version, "a metadata change is a write")
	require.Equal(t, c.Revision, ch.After.Revision, "metadata does not touch the credentials revision")
	require.Equal(t, []string{EventUpdated}, eventTypes(ch.Events))

	ch, err = b.store.Patch(ctx, refBamboo, Input{Metadata: json.RawMessage(`null`)}, 0)
	require.NoError(t, err)
	require.Nil(t, ch.After.Metadata)
	_, err = b.store.Patch(ctx, refBamboo, Input{Metadata: json.RawMessage(`"str"`)}, 0)
	var fe *FieldError
	require.ErrorAs(t, err, &fe)
}
