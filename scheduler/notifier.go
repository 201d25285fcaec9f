package scheduler

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Notifier enqueues the work a consumer-side write calls for at once, on
// the critical queue, instead of waiting for the next sweep. It is safe for
// concurrent use.
type Notifier struct {
	client  Enqueuer
	catalog *catalog.Catalog
	nowFunc func() time.Time
}

// NewNotifier returns a Notifier that enqueues through client (an
// *asynq.Client) and looks integrations up in cat.
func NewNotifier(client Enqueuer, cat *catalog.Catalog) *Notifier {
	return &Notifier{client: client, catalog: cat, nowFunc: time.Now}
}

// Notify looks at the result of one write and, for an enabled connection
// of a checkable integration:
//   - when the credentials revision moved (or the connection was created
//     with credentials), enqueues a critical validation, reason
//     credentials_changed, key "rev<revision>";
//   - otherwise, when the write enabled the connection, a critical
//     validation, reason enabled, key "en<version>";
//   - with either, when the connection's OAuth access token has expired
//     and a refresh token is stored, a critical refresh, reason expired,
//     key the expiry in unix seconds.
//
// A task already queued under the same id counts as enqueued. Writes that
// call for nothing (deletes, disables, verdicts, token refreshes) return
// nil at once.
func (n *Notifier) Notify(ctx context.Context, ch state.Change) error {
	a := ch.After
	if a == nil || !a.Enabled {
		return nil
	}
	in, ok := n.catalog.Get(a.ServiceID)
	if !ok || !in.Checkable() {
		return nil
	}
	b := ch.Before
	hasCreds := len(a.Credentials.Fields()) > 0
	var reason tasks.Reason
	var key string
	switch {
	case b == nil && hasCreds, b != nil && a.Revision != b.Revision && hasCreds:
		reason, key = tasks.ReasonCredentialsChanged, "rev"+strconv.FormatInt(a.Revision, 10)
	case b != nil && !b.Enabled:
		reason, key = tasks.ReasonEnabled, "en"+strconv.FormatInt(a.Version, 10)
	default:
		return nil
	}
	t, err := tasks.NewValidateTask(a.ConsumerID, a.ID, reason, key)
	if err != nil {
		return fmt.Errorf("scheduler: notify: %w", err)
	}
	var errs []error
	if err := enqueue(ctx, n.client, t); err != nil {
		errs = append(errs, fmt.Errorf("scheduler: notify: enqueue validation: %w", err))
	}
	c := a.Credentials
	if in.AuthType == catalog.AuthOAuth2 && state.CanRefresh(c, in) && state.TokenExpired(c, n.nowFunc()) {
		key := "0" // no expiry known: the access token is missing
		if !c.ExpiresAt.IsZero() {
			key = strconv.FormatInt(c.ExpiresAt.Unix(), 10)
		}
		t, err := tasks.NewRefreshTask(a.ConsumerID, a.ID, tasks.ReasonExpired, key)
		if err == nil {
			err = enqueue(ctx, n.client, t)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("scheduler: notify: enqueue refresh: %w", err))
		}
	}
	return errors.Join(errs...)
}

// enqueue enqueues t; a task id conflict means it is already queued.
func enqueue(ctx context.Context, c Enqueuer, t *asynq.Task) error {
	_, err := c.EnqueueContext(ctx, t)
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return nil
	}
	return err
}
