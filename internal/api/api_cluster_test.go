package api_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestAPIOnCluster serves the API with the store and asynq on a local
// three-master Redis Cluster: PUT connections of consumers spread over
// every shard, POST validate, GET them back, DELETE one.
func TestAPIOnCluster(t *testing.T) {
	rdb := redistest.StartCluster(t).Client(t)
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	client := asynq.NewClientFromRedisClient(rdb)
	notifier := &recordingNotifier{next: scheduler.NewNotifier(client, cat)}
	h, err := api.New(api.Config{Store: st, Catalog: cat, Notifier: notifier, Enqueuer: client,
		Tokens: mustTokens(t, testToken), Registerer: prometheus.NewRegistry()})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	b := &bundle{store: st, cat: cat, srv: srv, notifier: notifier, inspector: asynq.NewInspectorFromRedisClient(rdb)}
	ctx := context.Background()

	const n = 24
	shards := map[int]bool{}
	for i := range n {
		consumer := fmt.Sprintf("c-cluster-%02d", i)
		shards[st.ShardOf(consumer)] = true
		p := connPath(consumer, "crm", "pipedrive")
		r := b.req(t, "PUT", p, `{"enabled":true,"credentials":{"api_key":"pd-secret"}}`)
		require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
		require.Equal(t, "added", r.data(t)["state"])
	}
	require.Greater(t, len(shards), 8, "the consumers spread over the shards")
	pending, err := b.inspector.ListPendingTasks(tasks.QueueCritical)
	require.NoError(t, err)
	require.Len(t, pending, n, "each write queued its critical validation")

	p := connPath("c-cluster-03", "crm", "pipedrive")
	// The queued validation is already there: validate now finds it.
	r := b.req(t, "POST", p+"/validate", "")
	require.Equal(t, http.StatusAccepted, r.status, "%s", r.body)
	require.Equal(t, tasks.QueueCritical, r.data(t)["queue"])
	taskID := r.data(t)["task_id"].(string)
	info, err := b.inspector.GetTaskInfo(tasks.QueueCritical, taskID)
	require.NoError(t, err)
	require.Equal(t, tasks.TypeValidate, info.Type)

	// A verdict (as the worker writes it) shows in the read.
	c, err := st.Get(ctx, state.Ref{ConsumerID: "c-cluster-03", ConnectionID: "crm+pipedrive"})
	require.NoError(t, err)
	_, err = st.ApplyVerdict(ctx, c.Ref(), c.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	r = b.req(t, "GET", p, "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, "callable", r.data(t)["state"])
	require.NotContains(t, string(r.body), "pd-secret")

	r = b.req(t, "DELETE", p, "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.req(t, "GET", p, "")
	require.Equal(t, http.StatusNotFound, r.status)
	r = b.req(t, "GET", connPath("c-cluster-04", "crm", "pipedrive"), "")
	require.Equal(t, http.StatusOK, r.status)
}
