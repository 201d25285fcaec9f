// Package scheduler turns the store's due indexes into asynq tasks.
//
// The store keeps two sharded due indexes in Redis sorted sets: next check
// and next token refresh, scored by due time. Every Tick a Scheduler claims
// due members shard by shard (state.Store.ClaimDue: Lua scripts that move
// up to Batch due members to a lease score atomically, at the Redis server's
// TIME unless Config.NowFunc is set; a shard Redis refuses waits for the
// next sweep while the others go on) and enqueues one task per claim,
// EnqueueConcurrency at a time. What each claim becomes, under which id,
// and when it is due next is the store's scheduling policy
// (state.SweepTask, state.SweepNextCheck), the same one the store, the
// Notifier, the API and the worker ask:
//
//   - a check claim becomes a connection:validate task on the low queue
//     (reason scheduled, dedupe key = the due time in unix seconds); once
//     enqueued, the member is rescheduled to now + the catalog's interval for
//     its integration and state, spread by ±Jitter of the interval by a
//     fraction fixed per connection (state.Jitter) so that no provider sees
//     a thundering herd at the top of the hour;
//     (With a Store that implements BatchRescheduler the reschedules go
//     out in batches, one round trip for up to 256 claims.)
//   - a refresh claim becomes a connection:refresh_token task on the
//     critical queue (reason scheduled, or expired when the claim is overdue
//     by more than the longest refresh window of its integration). It is not
//     rescheduled: the store sets the next refresh due time when new tokens
//     are stored, and if the refresh fails the lease runs out and the member
//     is due again.
//
// A claim whose enqueue failed, or whose scheduler died between the claim
// and the enqueue, keeps its lease score and becomes due again when the
// lease runs out: nothing is lost. Because claims are atomic, several
// scheduler replicas can run at once without leader election; the task ids
// (type, connection and due time) are the second line of defence, and an
// asynq.ErrTaskIDConflict counts as "already queued".
//
// Backpressure: while the low queue holds MaxLowPending pending tasks or
// more, periodic check sweeps pause (refresh sweeps go on, and so does the
// write path's Notifier, which enqueues on the critical queue).
//
// Faults: a Redis error ends the sweep; the loop logs it (rate-limited),
// backs off exponentially up to 30 seconds and resumes. Run only returns
// when its context is done.
//
// The write path uses a Notifier: after each write the HTTP API passes the
// state.Change to Notify, which enqueues what state.TasksAfterWrite calls
// for: a critical validation when the credentials revision moved or the
// connection was enabled (and a refresh when its token is due), so a consumer
// sees `callable` or `invalid` within a second or two rather than at the
// next sweep.
package scheduler
