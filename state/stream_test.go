package state

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestEventStreamGroupReadsClaimsAndAcks(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	s := NewEventStream(rdb, "")
	add := func(typ string) string {
		id, err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: DefaultEventStream,
			Values: []any{"type", typ, "connection_id", "crm+acme", "consumer_id", "c1", "version", "3"}}).Result()
		require.NoError(t, err)
		return id
	}

	_, err := s.ReadGroup(ctx, "g", "a", ">", 10, 0)
	require.ErrorIs(t, err, ErrNoGroup, "no stream, no group")
	require.NoError(t, s.CreateGroup(ctx, "g", "0"))
	require.NoError(t, s.CreateGroup(ctx, "g", "0"), "an existing group is left alone")
	got, err := s.ReadGroup(ctx, "g", "a", ">", 10, 0)
	require.NoError(t, err)
	require.Empty(t, got, "an empty stream reads nothing, without waiting")

	id1, id2 := add(EventUpdated), add(EventInvalid)
	got, err = s.ReadGroup(ctx, "g", "a", ">", 10, time.Second)
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.Equal(t, id1, got[0].ID)
	ev, err := got[1].Event()
	require.NoError(t, err)
	require.Equal(t, Event{ID: id2, Type: EventInvalid, ConnectionID: "crm+acme", ConsumerID: "c1", Version: 3}, ev)

	// Unacknowledged entries are the consumer's own pending ones...
	got, err = s.ReadGroup(ctx, "g", "a", "0", 10, 0)
	require.NoError(t, err)
	require.Len(t, got, 2)
	require.NoError(t, s.Ack(ctx, "g", id1))
	// ...which another consumer claims once they were idle long enough.
	got, next, err := s.ClaimIdle(ctx, "g", "b", time.Hour, "0-0", 10)
	require.NoError(t, err)
	require.Empty(t, got)
	require.Equal(t, "0-0", next)
	time.Sleep(20 * time.Millisecond) // the entry's idle time must pass minIdle
	got, next, err = s.ClaimIdle(ctx, "g", "b", 10*time.Millisecond, "0-0", 10)
	require.NoError(t, err)
	require.Equal(t, []string{id2}, []string{got[0].ID})
	require.Equal(t, "0-0", next, "the whole pending list was scanned")

	cs, err := s.Consumers(ctx, "g")
	require.NoError(t, err)
	require.Len(t, cs, 2)
	pending := map[string]int64{}
	for _, c := range cs {
		pending[c.Name] = c.Pending
	}
	require.Equal(t, map[string]int64{"a": 0, "b": 1}, pending)
	require.NoError(t, s.DeleteConsumer(ctx, "g", "a"))
	cs, err = s.Consumers(ctx, "g")
	require.NoError(t, err)
	require.Len(t, cs, 1)

	// One entry by id, and one the stream no longer holds.
	e, ok, err := s.Entry(ctx, id1)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, EventUpdated, e.Values["type"])
	_, ok, err = s.Entry(ctx, "1-1")
	require.NoError(t, err)
	require.False(t, ok)

	// The stream deleted (a flushed Redis): every group command says so.
	require.NoError(t, rdb.Del(ctx, DefaultEventStream).Err())
	_, err = s.ReadGroup(ctx, "g", "b", "0", 10, 0)
	require.ErrorIs(t, err, ErrNoGroup)
	_, _, err = s.ClaimIdle(ctx, "g", "b", time.Millisecond, "0-0", 10)
	require.ErrorIs(t, err, ErrNoGroup)
}
