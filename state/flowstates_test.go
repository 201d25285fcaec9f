package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestFlowStatesAreTakenOnceAndExpire(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	f := NewFlowStates(rdb, "")

	require.NoError(t, f.Put(ctx, "d1", []byte(`{"consumer_id":"c1"}`), time.Minute))
	ttl := rdb.PTTL(ctx, "vf:connect:state:d1").Val()
	require.Greater(t, ttl, 50*time.Second, "key name and TTL as the connect flow always kept them")
	b, ok, err := f.Take(ctx, "d1")
	require.NoError(t, err)
	require.True(t, ok)
	require.JSONEq(t, `{"consumer_id":"c1"}`, string(b))
	_, ok, err = f.Take(ctx, "d1")
	require.NoError(t, err)
	require.False(t, ok, "a state is taken at most once")

	require.NoError(t, f.Put(ctx, "d2", []byte("x"), time.Millisecond))
	require.Eventually(t, func() bool { return rdb.Exists(ctx, "vf:connect:state:d2").Val() == 0 },
		2*time.Second, 5*time.Millisecond)
	_, ok, err = f.Take(ctx, "d2")
	require.NoError(t, err)
	require.False(t, ok, "an expired state is gone")

	require.ErrorContains(t, f.Put(ctx, "d3", []byte("x"), 0), "ttl")
	require.NoError(t, rdb.Close())
	_, _, err = f.Take(ctx, "d1")
	require.ErrorContains(t, err, "take flow state", "a Redis error is an error, not a missing state")
}
