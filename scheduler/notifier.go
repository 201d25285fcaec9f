package scheduler

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
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

// Notify enqueues the tasks the policy calls for after one write
// (state.TasksAfterWrite): for an enabled connection of a checkable
// integration whose credentials revision moved (or that was created with
// credentials) or that was enabled, a critical validation, and a refresh
// when its OAuth access token is due for one. A task already queued under
// the same id counts as enqueued. Writes that call for nothing (deletes,
// disables, verdicts, token refreshes) return nil at once.
func (n *Notifier) Notify(ctx context.Context, ch state.Change) error {
	a := ch.After
	if a == nil || !a.Enabled {
		return nil
	}
	in, _ := n.catalog.Get(a.ServiceID)
	var errs []error
	for _, spec := range state.TasksAfterWrite(ch.Before, a, in, n.nowFunc()) {
		t, opts, err := spec.New()
		if err == nil {
			err = enqueue(ctx, n.client, t, opts...)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("scheduler: notify: enqueue %s: %w", spec.Type, err))
		}
	}
	return errors.Join(errs...)
}

// enqueue enqueues t; a task id conflict means it is already queued.
func enqueue(ctx context.Context, c Enqueuer, t *asynq.Task, opts ...asynq.Option) error {
	_, err := c.EnqueueContext(ctx, t, opts...)
	if errors.Is(err, asynq.ErrTaskIDConflict) {
		return nil
	}
	return err
}
