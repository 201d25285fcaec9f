package scheduler_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// fakeEnqueuer records "reason task-id" of every task; err, if set, is
// returned for every call.
type fakeEnqueuer struct {
	mu  sync.Mutex
	ids []string
	err error
}

func (f *fakeEnqueuer) EnqueueContext(_ context.Context, t *asynq.Task, _ ...asynq.Option) (*asynq.TaskInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	p, err := tasks.ParseConnectionPayload(t.Payload())
	if err != nil {
		return nil, err
	}
	id := tasks.TaskID(t.Type(), p.ConsumerID, p.ConnectionID, p.Key)
	f.ids = append(f.ids, string(p.Reason)+" "+id)
	return &asynq.TaskInfo{ID: id, Type: t.Type()}, nil
}

func TestNotify(t *testing.T) {
	t.Parallel()
	cat := loadCatalog(t)
	now := time.Now()
	apiKey := func(enabled bool, rev, version int64) *state.Connection {
		return &state.Connection{ID: pipedrive, ConsumerID: "c1", ServiceID: "pipedrive", UnifiedAPI: "crm",
			Enabled: enabled, Revision: rev, Version: version, Credentials: state.Credentials{APIKey: "k"}}
	}
	oauth := func(enabled bool, exp time.Time, version int64) *state.Connection {
		return &state.Connection{ID: hubspot, ConsumerID: "c1", ServiceID: "hubspot", UnifiedAPI: "crm",
			Enabled: enabled, Revision: 1, Version: version,
			Credentials: state.Credentials{AccessToken: "a", RefreshToken: "r", ExpiresAt: exp}}
	}
	noCreds := apiKey(true, 0, 1)
	noCreds.Credentials = state.Credentials{}
	unchecked := apiKey(true, 1, 1)
	unchecked.ID, unchecked.ServiceID = zoho, "zoho"
	expired := now.Add(-time.Hour).Truncate(time.Second)
	// Every reason the Notifier uses maps to the critical queue.
	v := func(id, key string) string {
		reason := tasks.ReasonCredentialsChanged
		if key[:2] == "en" {
			reason = tasks.ReasonEnabled
		}
		return string(reason) + " " + tasks.TaskID(tasks.TypeValidate, "c1", id, key)
	}
	r := func(id, key string) string {
		return string(tasks.ReasonExpired) + " " + tasks.TaskID(tasks.TypeRefreshToken, "c1", id, key)
	}
	tests := map[string]struct {
		before, after *state.Connection
		want          []string
	}{
		"CreatedWithCredentials":    {after: apiKey(true, 1, 1), want: []string{v(pipedrive, "rev1")}},
		"CreatedWithoutCredentials": {after: noCreds},
		"CreatedDisabled":           {after: apiKey(false, 1, 1)},
		"RevisionBumped":            {before: apiKey(true, 1, 3), after: apiKey(true, 2, 4), want: []string{v(pipedrive, "rev2")}},
		"RevisionBumpedDisabled":    {before: apiKey(false, 1, 3), after: apiKey(false, 2, 4)},
		"Enabled":                   {before: apiKey(false, 1, 3), after: apiKey(true, 1, 4), want: []string{v(pipedrive, "en4")}},
		"EnabledWithNewCredentials": {before: apiKey(false, 1, 3), after: apiKey(true, 2, 4), want: []string{v(pipedrive, "rev2")}},
		"Disabled":                  {before: apiKey(true, 1, 3), after: apiKey(false, 1, 4)},
		"Deleted":                   {before: apiKey(true, 1, 3)},
		"VerdictOnly":               {before: apiKey(true, 1, 3), after: apiKey(true, 1, 4)},
		"NotChecked":                {after: unchecked},
		"EnabledTokenValid":         {before: oauth(false, now.Add(time.Hour), 2), after: oauth(true, now.Add(time.Hour), 3), want: []string{v(hubspot, "en3")}},
		"EnabledTokenExpired": {before: oauth(false, expired, 2), after: oauth(true, expired, 3),
			want: []string{v(hubspot, "en3"), r(hubspot, unix(expired))}},
		"TokenRefreshed": {before: oauth(true, expired, 2), after: oauth(true, now.Add(time.Hour), 3)},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := &fakeEnqueuer{}
			n := scheduler.NewNotifier(f, cat)
			require.NoError(t, n.Notify(context.Background(), state.Change{Before: tc.before, After: tc.after}))
			require.Equal(t, tc.want, f.ids)
		})
	}
}

func TestNotifyErrors(t *testing.T) {
	t.Parallel()
	cat := loadCatalog(t)
	conn := &state.Connection{ID: pipedrive, ConsumerID: "c1", ServiceID: "pipedrive", Enabled: true,
		Revision: 1, Version: 1, Credentials: state.Credentials{APIKey: "k"}}

	conflict := scheduler.NewNotifier(&fakeEnqueuer{err: asynq.ErrTaskIDConflict}, cat)
	require.NoError(t, conflict.Notify(context.Background(), state.Change{After: conn}), "already queued")

	down := errors.New("redis down")
	failing := scheduler.NewNotifier(&fakeEnqueuer{err: down}, cat)
	err := failing.Notify(context.Background(), state.Change{After: conn})
	require.ErrorIs(t, err, down)
	require.ErrorContains(t, err, "scheduler: notify")
}
