package worker

import (
	"context"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

// TestUnreadableCredentialsAreNotRetried: a connection whose credentials
// were sealed with a key the worker no longer holds is archived at once
// (SkipRetry) with a clear result, by validation and refresh alike,
// instead of being retried as if Redis were down.
func TestUnreadableCredentialsAreNotRetried(t *testing.T) {
	b := setup(t)
	b.p.handle("/acme/me", status(200))
	b.put("crm+acme", acmeKey(), nil) // sealed under k1
	keys, err := secrets.ParseKeyring(secrets.NewKey("k2"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: b.rdb, Catalog: b.cat, Keys: keys})
	require.NoError(t, err)
	w := b.worker(func(c *Config) { c.Store = st })

	err = process(t, w, validateTask(t, "crm+acme"))
	require.ErrorIs(t, err, asynq.SkipRetry)
	require.ErrorIs(t, err, state.ErrUnreadable)
	require.Contains(t, b.logs.String(), `"skipped":"`+skipUnreadable+`"`)
	require.Contains(t, err.Error(), `"k1"`)

	err = process(t, w, refreshTask(t, "crm+acme", "on_demand", ""))
	require.ErrorIs(t, err, asynq.SkipRetry)
	require.ErrorIs(t, err, state.ErrUnreadable)
	require.Equal(t, 2, strings.Count(b.logs.String(), `"skipped":"`+skipUnreadable+`"`), "both tasks say why")
	require.NotContains(t, b.logs.String(), "store unavailable")
	require.Equal(t, 2, strings.Count(b.logs.String(), `"level":"WARN","msg":"task done"`), "an operator must act: logged as a warning")

	require.Zero(t, b.p.total(), "no provider call")
	requireNoSecrets(t, b.logs.String())
	requireNoSecrets(t, err.Error())
	_, err = b.store.Get(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: "crm+acme"})
	require.NoError(t, err, "the k1 store still reads it: nothing was written")
}
