package scheduler_test

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// confirmCatalog adds to testCatalog an api_key integration (close) whose
// invalid verdicts are confirmed once, a minute later.
const confirmCatalog = testCatalog + `  - id: close
    name: Close
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: https://api.close.com/api/v1/me/
      auth: {scheme: query, name: api_key, field: api_key}
    allowed_hosts: [api.close.com]
    confirm_invalid: 1
    confirm_spacing: 1m
`

const closeConn = "crm+close"

// setupPolicy is setup on confirmCatalog.
func setupPolicy(t *testing.T) *bundle {
	t.Helper()
	b := setupOn(t, redistest.Start(t).Client(t), nil)
	cat, err := catalog.Parse([]byte(confirmCatalog))
	require.NoError(t, err)
	b.cat = cat
	b.store, err = state.New(state.Config{Client: b.rdb, Catalog: cat, Keys: testKeys(t),
		NowFunc: func() time.Time { return b.t0 }})
	require.NoError(t, err)
	return b
}

// validateTasks lists the validations of ref in queue: pending and
// scheduled.
func validateTasks(t *testing.T, b *bundle, queue string, ref state.Ref) []*asynq.TaskInfo {
	t.Helper()
	var out []*asynq.TaskInfo
	list := allTasks(t, b.insp, queue)
	if sched, err := b.insp.ListScheduledTasks(queue); err == nil {
		list = append(list, sched...)
	}
	for _, ti := range list {
		p := payload(t, ti)
		if ti.Type == tasks.TypeValidate && p.ConsumerID == ref.ConsumerID && p.ConnectionID == ref.ConnectionID {
			out = append(out, ti)
		}
	}
	return out
}

// TestNoSecondCheckAfterReauthorization: a re-authorization (new tokens,
// a new revision) is validated once, by the notifier's critical task. The
// check index's safety net, 30 s after the write, ends with that task's
// verdict, even though the state stays callable: a sweep after it
// enqueues nothing, and the next check is one interval on.
func TestNoSecondCheckAfterReauthorization(t *testing.T) {
	t.Parallel()
	b := setupPolicy(t)
	ctx := context.Background()
	ref := state.Ref{ConsumerID: "c1", ConnectionID: hubspot}
	ch, err := b.store.Put(ctx, ref, oauthInput(b.t0.Add(2*time.Hour)), 0)
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)

	b.t0 = b.t0.Add(10 * time.Minute)
	in := oauthInput(b.t0.Add(2 * time.Hour))
	in.Credentials["access_token"], in.Credentials["refresh_token"] = "at2", "rt2"
	ch, err = b.store.Put(ctx, ref, in, 0)
	require.NoError(t, err)
	require.Equal(t, state.Callable, ch.After.State)
	require.NoError(t, scheduler.NewNotifier(b.client, b.cat).Notify(ctx, ch))
	// The worker runs the critical validation and writes its verdict.
	_, err = b.store.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
	require.NoError(t, err)

	s, err := scheduler.New(b.config(fixed(b.t0.Add(31 * time.Second))))
	require.NoError(t, err)
	require.NoError(t, s.Sweep(ctx))
	require.Empty(t, validateTasks(t, b, tasks.QueueLow, ref), "no second check after the re-authorization")
	crit := validateTasks(t, b, tasks.QueueCritical, ref)
	require.Len(t, crit, 1)
	require.Equal(t, tasks.ReasonCredentialsChanged, payload(t, crit[0]).Reason)
	due, ok, err := b.store.DueAt(ctx, state.IndexCheck, ref)
	require.NoError(t, err)
	require.True(t, ok)
	require.False(t, due.Before(b.t0.Add(54*time.Minute)), "next check one interval after the verdict, got %v", due.Sub(b.t0))
}

// TestConfirmationCheckedOnce: an invalid verdict held for confirmation
// is confirmed by the one task the worker enqueues (state.ConfirmTask),
// not also by a sweep of the check index at the same time. Only a lost
// confirming task leaves it to the index, after a grace.
func TestConfirmationCheckedOnce(t *testing.T) {
	t.Parallel()
	b := setupPolicy(t)
	ctx := context.Background()
	ref := state.Ref{ConsumerID: "c1", ConnectionID: closeConn}
	lost := state.Ref{ConsumerID: "c2", ConnectionID: closeConn}
	in, ok := b.cat.Get("close")
	require.True(t, ok)
	t0 := b.t0
	for _, r := range []state.Ref{ref, lost} {
		ch, err := b.store.Put(ctx, r, state.Input{Credentials: map[string]string{"api_key": "k"}}, 0)
		require.NoError(t, err)
		rev := ch.After.Revision
		_, err = b.store.ApplyVerdict(ctx, r, rev, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed})
		require.NoError(t, err)
		ch, err = b.store.ApplyVerdict(ctx, r, rev, state.Verdict{Outcome: state.OutcomeInvalid, Reason: state.ReasonCredentialsRejected, HTTPStatus: 401})
		require.NoError(t, err)
		require.Equal(t, state.HealthPendingConfirmation, ch.After.Health)
		if r == lost {
			continue // its confirming task is lost
		}
		// What the worker's confirmLater does.
		spec, ok := state.ConfirmTask(ch.After, in, rev)
		require.True(t, ok)
		task, opts, err := spec.New()
		require.NoError(t, err)
		_, err = b.client.EnqueueContext(ctx, task, opts...)
		require.NoError(t, err)
	}

	// Sweeps while the confirming check is due and just after: the index
	// enqueues no other check of the connection.
	for _, at := range []time.Duration{time.Minute, time.Minute + 5*time.Second, 3 * time.Minute} {
		s, err := scheduler.New(b.config(fixed(t0.Add(at))))
		require.NoError(t, err)
		require.NoError(t, s.Sweep(ctx))
		require.Empty(t, validateTasks(t, b, tasks.QueueLow, ref), "sweep at +%v", at)
		require.Empty(t, validateTasks(t, b, tasks.QueueLow, lost), "sweep at +%v", at)
	}
	confirms := validateTasks(t, b, tasks.QueueDefault, ref)
	require.Len(t, confirms, 1, "one confirming check")
	require.Equal(t, tasks.ReasonConfirm, payload(t, confirms[0]).Reason)

	// The lost task: the index checks the connection after the grace.
	s, err := scheduler.New(b.config(fixed(t0.Add(6*time.Minute + time.Second))))
	require.NoError(t, err)
	require.NoError(t, s.Sweep(ctx))
	require.Len(t, validateTasks(t, b, tasks.QueueLow, lost), 1, "the safety net of a lost confirming task")
	require.Len(t, validateTasks(t, b, tasks.QueueLow, ref), 1, "the confirming task did not run here either")
}
