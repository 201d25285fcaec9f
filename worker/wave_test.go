package worker

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestInvalidWaveHeldBack: the provider suddenly rejects every key of an
// integration whose catalog entry sets invalid_wave (threshold 2 per
// minute). The first two invalid verdicts apply; the rest are held back as
// transient failures retried after the window, state unchanged, counted
// and logged; checks still count as invalid so the InvalidationWave alert
// sees the wave. An integration without the guard invalidates them all.
func TestInvalidWaveHeldBack(t *testing.T) {
	b := setup(t)
	b.p.handle("/waveco/me", status(401))
	b.p.handle("/only401/me", status(401))
	w := b.worker()
	ctx := context.Background()
	const n = 5
	for _, svc := range []string{"waveco", "only401"} {
		for i := range n {
			ref := state.Ref{ConsumerID: fmt.Sprintf("wave-%d", i), ConnectionID: "crm+" + svc}
			_, err := b.store.Put(ctx, ref, state.Input{Credentials: acmeKey()}, 0)
			require.NoError(t, err)
		}
	}
	held := 0
	for i := range n {
		task, err := tasks.NewValidateTask(fmt.Sprintf("wave-%d", i), "crm+waveco", tasks.ReasonOnDemand, "")
		require.NoError(t, err)
		err = process(t, w, task)
		c, gerr := b.store.Get(ctx, state.Ref{ConsumerID: fmt.Sprintf("wave-%d", i), ConnectionID: "crm+waveco"})
		require.NoError(t, gerr)
		if i < 2 {
			require.NoError(t, err)
			require.Equal(t, state.Invalid, c.State, "below the threshold the verdict applies")
			continue
		}
		held++
		var ra *RetryAfterError
		require.True(t, errors.As(err, &ra), "held back as a retry: %v", err)
		require.Equal(t, time.Minute, ra.After, "retried after the window")
		require.Contains(t, err.Error(), "invalid verdict held")
		require.Equal(t, state.Added, c.State, "state unchanged while held")
		require.Equal(t, state.HealthDegraded, c.Health)
	}
	require.Equal(t, float64(held), testutil.ToFloat64(w.metrics.held.WithLabelValues("waveco")))
	require.Equal(t, float64(n), testutil.ToFloat64(w.metrics.checks.WithLabelValues("waveco", outcomeInvalid)))
	require.Contains(t, b.logs.String(), "invalid verdict held back: wave of invalid verdicts")

	for i := range n {
		task, err := tasks.NewValidateTask(fmt.Sprintf("wave-%d", i), "crm+only401", tasks.ReasonOnDemand, "")
		require.NoError(t, err)
		require.NoError(t, process(t, w, task))
		c, err := b.store.Get(ctx, state.Ref{ConsumerID: fmt.Sprintf("wave-%d", i), ConnectionID: "crm+only401"})
		require.NoError(t, err)
		require.Equal(t, state.Invalid, c.State, "no guard: every verdict applies")
	}
	require.Zero(t, testutil.ToFloat64(w.metrics.held.WithLabelValues("only401")))
	requireNoSecrets(t, b.logs.String())
}
