package worker

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestWorkerOnCluster runs the worker with the store and asynq on a local
// three-master Redis Cluster: validations enqueued through asynq turn
// connections callable or invalid as the provider says, and a token
// refresh (refresh lease, exchange intent, fenced write) stores the
// provider's rotated tokens.
func TestWorkerOnCluster(t *testing.T) {
	cl := redistest.StartCluster(t)
	rdb := cl.Client(t)
	b := &bundle{t: t, logs: &syncBuffer{}}
	b.p = newProvider(t)
	b.cat = testCatalog(t, b.p.host)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	b.store, err = state.New(state.Config{Client: rdb, Catalog: b.cat, Keys: keys})
	require.NoError(t, err)
	b.p.handle("/acme/me", requireHeader("X-Api-Token", "Token "+secretAPIKey))
	o := newOAuthAPI(b)

	const n = 12
	refs := make([]state.Ref, n)
	for i := range refs {
		refs[i] = state.Ref{ConsumerID: "cluster-" + string(rune('a'+i)), ConnectionID: "crm+acme"}
		key := secretAPIKey
		if i%3 == 0 {
			key = "sk_live_SECRET_wrong"
		}
		_, err := b.store.Put(context.Background(), refs[i], state.Input{Credentials: map[string]string{"api_key": key}}, 0)
		require.NoError(t, err)
	}
	oauth := b.putOAuth(90 * time.Second) // inside its refresh window

	cfg := b.config()
	cfg.Redis = rdb
	w, err := New(cfg)
	require.NoError(t, err)
	b.start(w)
	client := asynq.NewClientFromRedisClient(rdb)
	for _, r := range refs {
		task, err := tasks.NewValidateTask(r.ConsumerID, r.ConnectionID, tasks.ReasonOnDemand, "")
		require.NoError(t, err)
		_, err = client.Enqueue(task)
		require.NoError(t, err)
	}
	_, err = client.Enqueue(refreshTask(t, ocoID, tasks.ReasonScheduled, "1"))
	require.NoError(t, err)

	for i, r := range refs {
		want := state.Callable
		if i%3 == 0 {
			want = state.Invalid
		}
		eventually(t, 20*time.Second, func() bool {
			c, err := b.store.Get(context.Background(), r)
			return err == nil && c.State == want
		}, "%s becomes %s", r, want)
	}
	eventually(t, 20*time.Second, func() bool {
		at, rt := o.current()
		c := b.get(ocoID)
		return at != "" && c.Credentials.AccessToken == at && c.Credentials.RefreshToken == rt
	}, "the refreshed tokens are stored")
	require.EqualValues(t, 1, o.calls.Load())
	require.Equal(t, oauth.Revision, b.get(ocoID).Revision)
	requireNoSecrets(t, b.logs.String())
}
