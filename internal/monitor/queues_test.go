package monitor

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestRegisterQueues: queues nothing was enqueued to yet are listed by
// asynq and open in the monitor once registered; registering again
// changes nothing.
func TestRegisterQueues(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	insp := asynq.NewInspectorFromRedisClient(rdb)
	h, err := New(Config{RedisConnOpt: asynq.RedisClientOpt{Addr: rdb.Options().Addr, DB: rdb.Options().DB}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)

	resp, err := http.Get(srv.URL + "/monitor/api/queues/" + tasks.QueueEvents)
	require.NoError(t, err)
	resp.Body.Close()
	require.NotEqual(t, http.StatusOK, resp.StatusCode, "an unknown queue does not open")

	names := []string{tasks.QueueCritical, tasks.QueueDefault, tasks.QueueLow, tasks.QueueEvents}
	for range 2 {
		require.NoError(t, RegisterQueues(context.Background(), rdb, names...))
	}
	got, err := insp.Queues()
	require.NoError(t, err)
	slices.Sort(got)
	want := slices.Clone(names)
	slices.Sort(want)
	require.Equal(t, want, got)
	for _, q := range names {
		resp, err := http.Get(srv.URL + "/monitor/api/queues/" + q)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, q)
	}
	require.NoError(t, RegisterQueues(context.Background(), rdb))
}
