package state

// The scheduling policy: the one answer to "what is due when, on which
// queue, under which task id". The store's due-index scores, the
// scheduler's sweep, the notifier, the API's on-demand tasks, the worker's
// refresh decisions and confirming checks and vaultfleet dev all ask it.
// It is pure: no I/O, no clock (now is always an argument), and its
// jitter is a hash of the connection, so tests can pin every answer.
//
// It lives in package state, not in a leaf package, because every answer
// is about a Connection (its state, revision, confirmation, credentials),
// which state owns; a leaf package would need a copy of those types or an
// interface over them. state already imports catalog and tasks, and
// neither imports state, so no cycle: the scheduler, worker and API reach
// it through the state package they already import.

import (
	"hash/fnv"
	"strconv"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// DefaultJitter is the spread of next check times: a connection's next
// check comes its interval ±10% after the last one (Jitter).
const DefaultJitter = 0.10

const (
	// DefaultCheckInterval is the interval of a state the catalog gives
	// none, and how far a member of an integration that is not checked
	// (unknown, or its connector status not live or beta) is pushed back.
	DefaultCheckInterval = time.Hour
	// confirmGrace is how long after a confirming check is due the check
	// index holds the connection back: the confirming task (enqueued by
	// the worker with ConfirmSpacing delay) is what checks it, the index
	// only catches a lost task. It covers a busy default queue and the
	// task's first retries.
	confirmGrace = 5 * time.Minute
)

// Jitter spreads d over [d−spread·d, d+spread·d) by a fraction fixed per
// connection (a hash of ref): connections that changed together do not
// come due together, and the answer for one connection never varies.
// spread is clamped to [0, 0.5].
func Jitter(ref Ref, d time.Duration, spread float64) time.Duration {
	if d <= 0 || !(spread > 0) {
		return d
	}
	spread = min(spread, 0.5)
	h := fnv.New64a()
	h.Write([]byte(ref.ConsumerID))
	h.Write([]byte{'|'})
	h.Write([]byte(ref.ConnectionID))
	u := float64(h.Sum64()>>11) / (1 << 53) // [0, 1)
	return time.Duration(float64(d) * (1 + spread*(2*u-1)))
}

// CheckInterval is how long after a check a connection in state st is
// checked again: the catalog's interval for st, or DefaultCheckInterval.
// A nil integration (left the catalog) gets DefaultCheckInterval.
func CheckInterval(in *catalog.Integration, st State) time.Duration {
	if in != nil {
		if d := in.Interval(string(st)); d > 0 {
			return d
		}
	}
	return DefaultCheckInterval
}

// NextCheckAt is when a connection in state st, checked (or enqueued for
// a check) at now, is checked again: its interval, jittered by spread.
func NextCheckAt(ref Ref, in *catalog.Integration, st State, now time.Time, spread float64) time.Time {
	return now.Add(Jitter(ref, CheckInterval(in, st), spread))
}

// checkEligible reports whether a connection belongs in due:check.
func checkEligible(c *Connection, in *catalog.Integration) bool {
	if c == nil || in == nil || !c.Enabled || !in.Checkable() {
		return false
	}
	switch c.State {
	case Available, Authorized:
		return false
	case Added:
		return hasCredentials(c, in)
	}
	return true
}

// refreshEligible reports whether a connection belongs in due:refresh.
func refreshEligible(c *Connection, in *catalog.Integration) bool {
	return c != nil && in != nil && c.Enabled && in.Checkable() && in.AuthType == catalog.AuthOAuth2 &&
		CanRefresh(c.Credentials, in) && !c.Credentials.ExpiresAt.IsZero() && c.Health != HealthRevoked &&
		c.Health != HealthRotationLost
}

// Due modes of the write script.
const (
	dueRemove = "d"
	dueSet    = "s"
	dueIfNone = "n"
)

// dueCheck decides the due:check entry of a written connection (next, its
// identity set): a mode of the write script and a time.
//   - Not eligible (disabled, not checkable, no credentials...): removed.
//   - New, enabled again, new credentials, or checkable again: the writer's
//     caller enqueues a validation now (TasksAfterWrite); the entry is the
//     safety net for a lost enqueue, safetyNet later.
//   - An invalid verdict held for confirmation: the worker enqueues the
//     confirming check ConfirmSpacing later (ConfirmTask); the entry waits
//     confirmGrace beyond it, so the connection is checked once, by that
//     task, and the index only catches a lost one.
//   - Any other verdict: a check just ran, the next is one interval on.
//     This also ends the safety net of a credentials change once its
//     validation gave a verdict (no second check 30 s after a
//     re-authorization), and the grace of an ended confirmation.
//   - Other writes keep the entry the scheduler set, or set one interval
//     on if there is none.
func dueCheck(cur, next *Connection, in *catalog.Integration, h hints, now time.Time) (string, time.Time) {
	if !checkEligible(next, in) {
		return dueRemove, time.Time{}
	}
	ref := Ref{ConsumerID: next.ConsumerID, ConnectionID: next.ID}
	switch {
	case cur == nil, !cur.Enabled, cur.Revision != next.Revision, !checkEligible(cur, in):
		return dueSet, now.Add(safetyNet)
	case h.confirm:
		return dueSet, now.Add(in.ConfirmSpacingOrDefault() + confirmGrace)
	case h.verdict:
		return dueSet, NextCheckAt(ref, in, next.State, now, DefaultJitter)
	}
	return dueIfNone, NextCheckAt(ref, in, next.State, now, DefaultJitter)
}

// dueRefresh decides the due:refresh entry of a written connection: at
// RefreshAt. The score is only rewritten when the expiry changed or the
// connection just became eligible, so a scheduler's lease survives
// unrelated writes.
func dueRefresh(cur, next *Connection, in *catalog.Integration) (string, time.Time) {
	if !refreshEligible(next, in) {
		return dueRemove, time.Time{}
	}
	at := RefreshAt(next.Credentials, in)
	if !refreshEligible(cur, in) || !cur.Credentials.ExpiresAt.Equal(next.Credentials.ExpiresAt) {
		return dueSet, at
	}
	return dueIfNone, at
}

// TokenLifetime is the lifetime of c's access token: ExpiresAt - IssuedAt
// when both are known, else the catalog's TokenLifetime.
func TokenLifetime(c Credentials, in *catalog.Integration) time.Duration {
	if !c.IssuedAt.IsZero() && c.ExpiresAt.After(c.IssuedAt) {
		return c.ExpiresAt.Sub(c.IssuedAt)
	}
	return in.TokenLifetimeOrDefault()
}

// RefreshWindow is how long before its expiry c's access token is
// refreshed: the integration's window for the token's lifetime
// (catalog.Integration.RefreshWindowFor), and never less than the token's
// expiry skew, so a token TokenExpired calls expired is always due.
func RefreshWindow(c Credentials, in *catalog.Integration) time.Duration {
	return max(in.RefreshWindowFor(TokenLifetime(c, in)), skewFor(c))
}

// maxRefreshWindow is the longest RefreshWindow the integration gives any
// token: a refresh claimed that long after its due time is for a token
// that has expired, whatever its lifetime.
func maxRefreshWindow(in *catalog.Integration) time.Duration {
	return max(in.RefreshWindowFor(0), ExpirySkew)
}

// RefreshAt is when a token is due for refresh ahead of expiry: ExpiresAt
// minus RefreshWindow. It is the one answer to "when is this token
// refreshed": the due index, the worker and the notifier all use it.
func RefreshAt(c Credentials, in *catalog.Integration) time.Time {
	return c.ExpiresAt.Add(-RefreshWindow(c, in))
}

// RefreshDue reports whether c's access token should be refreshed at now:
// it can be refreshed (a refresh token, or the client-credentials grant)
// and its access token is missing or at or past RefreshAt. A token without
// an expiry is never due.
func RefreshDue(c Credentials, in *catalog.Integration, now time.Time) bool {
	if !CanRefresh(c, in) {
		return false
	}
	if c.AccessToken == "" {
		return true
	}
	return !c.ExpiresAt.IsZero() && !now.Before(RefreshAt(c, in))
}

// defaultExpiry gives an OAuth access token without a known expiry the
// catalog's TokenLifetime from when it was issued (Salesforce's token
// responses carry no expires_in), so that it is refreshed ahead of time
// and a 401 after its real expiry is seen as an expired token, not as
// rejected credentials.
func defaultExpiry(c *Credentials, in *catalog.Integration) {
	if in.AuthType != catalog.AuthOAuth2 || c.AccessToken == "" || !c.ExpiresAt.IsZero() || c.IssuedAt.IsZero() {
		return
	}
	c.ExpiresAt = c.IssuedAt.Add(in.TokenLifetimeOrDefault())
}

// Task is a connection task the policy calls for: its type, connection,
// reason and dedupe key, and how long to hold it before it runs. Its id
// and queue follow from those (ID, Queue); New builds it.
type Task struct {
	// Type is tasks.TypeValidate or tasks.TypeRefreshToken.
	Type   string
	Ref    Ref
	Reason tasks.Reason
	// Key dedupes (tasks.ConnectionPayload.Key).
	Key string
	// Delay holds the task back (asynq.ProcessIn); 0 runs it at once.
	Delay time.Duration
}

// ID is the asynq task id the task is enqueued under: the connection's one
// refresh chain for a refresh, the type, connection and key otherwise.
func (t Task) ID() string {
	if t.Type == tasks.TypeRefreshToken {
		return tasks.RefreshTaskID(t.Ref.ConsumerID, t.Ref.ConnectionID)
	}
	if t.Key == "" {
		return ""
	}
	return tasks.TaskID(t.Type, t.Ref.ConsumerID, t.Ref.ConnectionID, t.Key)
}

// Queue is the queue the task goes to.
func (t Task) Queue() string { return tasks.QueueFor(t.Type, t.Reason) }

// New builds the asynq task and the options to enqueue it with (its delay).
func (t Task) New() (*asynq.Task, []asynq.Option, error) {
	var at *asynq.Task
	var err error
	if t.Type == tasks.TypeRefreshToken {
		at, err = tasks.NewRefreshTask(t.Ref.ConsumerID, t.Ref.ConnectionID, t.Reason, t.Key)
	} else {
		at, err = tasks.NewValidateTask(t.Ref.ConsumerID, t.Ref.ConnectionID, t.Reason, t.Key)
	}
	if err != nil {
		return nil, nil, err
	}
	var opts []asynq.Option
	if t.Delay > 0 {
		opts = append(opts, asynq.ProcessIn(t.Delay))
	}
	return at, opts, nil
}

// refreshKey is the key of a refresh task: the token's expiry in unix
// seconds, "0" when none is known (the access token is missing).
func refreshKey(c Credentials) string {
	if c.ExpiresAt.IsZero() {
		return "0"
	}
	return strconv.FormatInt(c.ExpiresAt.Unix(), 10)
}

// SweepTask is the task of a member the scheduler claimed from index idx:
// a scheduled validation, or a refresh (reason expired once the claim is
// so late that the token has expired whatever its lifetime), keyed by the
// claimed due time so that replicas claiming the same due time make one
// task. in is the member's integration (nil: unknown); ok is false when
// the integration is not checked, and nothing is to be enqueued.
func SweepTask(idx Index, c Claim, in *catalog.Integration, now time.Time) (t Task, ok bool) {
	if in == nil || !in.Checkable() {
		return Task{}, false
	}
	t = Task{Type: tasks.TypeValidate, Ref: c.Ref, Reason: tasks.ReasonScheduled,
		Key: strconv.FormatInt(c.Due.Unix(), 10)}
	if idx == IndexRefresh {
		t.Type = tasks.TypeRefreshToken
		if now.Sub(c.Due) >= maxRefreshWindow(in) {
			t.Reason = tasks.ReasonExpired
		}
	}
	return t, true
}

// SweepNextCheck is when the scheduler makes a claimed check member due
// again after enqueueing its task at now (or, for an integration that is
// not checked, pushes it back): its state's interval, jittered by spread.
// The verdict of the check sets it again (dueCheck).
func SweepNextCheck(c Claim, in *catalog.Integration, now time.Time, spread float64) time.Time {
	if in == nil || !in.Checkable() {
		return now.Add(Jitter(c.Ref, DefaultCheckInterval, spread))
	}
	return NextCheckAt(c.Ref, in, c.State, now, spread)
}

// TasksAfterWrite is the work a consumer-side write from before to after
// (nil before: created) calls for at once, for an enabled connection of a
// checkable integration:
//   - when the credentials revision moved (or the connection was created
//     with credentials), a critical validation, reason credentials_changed,
//     key "rev<revision>" (CredentialsTask);
//   - otherwise, when the write enabled the connection, a critical
//     validation, reason enabled, key "en<version>";
//   - with either, when the OAuth access token is due for refresh
//     (RefreshDue: missing, expired or within its refresh window), a
//     refresh, reason expired, key the expiry.
//
// Other writes (deletes, disables, verdicts, token refreshes) call for
// nothing: the due indexes carry them.
func TasksAfterWrite(before, after *Connection, in *catalog.Integration, now time.Time) []Task {
	if after == nil || !after.Enabled || in == nil || !in.Checkable() {
		return nil
	}
	ref := after.Ref()
	hasCreds := len(after.Credentials.Fields()) > 0
	var out []Task
	switch {
	case before == nil && hasCreds, before != nil && after.Revision != before.Revision && hasCreds:
		out = append(out, CredentialsTask(after))
	case before != nil && !before.Enabled:
		out = append(out, Task{Type: tasks.TypeValidate, Ref: ref, Reason: tasks.ReasonEnabled,
			Key: "en" + strconv.FormatInt(after.Version, 10)})
	default:
		return nil
	}
	if in.AuthType == catalog.AuthOAuth2 && RefreshDue(after.Credentials, in, now) {
		out = append(out, Task{Type: tasks.TypeRefreshToken, Ref: ref, Reason: tasks.ReasonExpired,
			Key: refreshKey(after.Credentials)})
	}
	return out
}

// CredentialsTask is the validation of c's current credentials revision:
// critical, reason credentials_changed, key "rev<revision>", one per
// revision however many writers ask for it.
func CredentialsTask(c *Connection) Task {
	return Task{Type: tasks.TypeValidate, Ref: c.Ref(),
		Reason: tasks.ReasonCredentialsChanged, Key: "rev" + strconv.FormatInt(c.Revision, 10)}
}

// OnDemandTask is the task somebody asked for (the API's "validate now"
// and "refresh now") of type typ: a validation keyed by the connection's
// version (one per version however often it is asked), or a refresh.
func OnDemandTask(c *Connection, typ string) Task {
	t := Task{Type: typ, Ref: c.Ref(), Reason: tasks.ReasonOnDemand}
	if typ == tasks.TypeRefreshToken {
		t.Key = refreshKey(c.Credentials)
	} else {
		t.Key = "od" + strconv.FormatInt(c.Version, 10)
	}
	return t
}

// ConfirmTask is the next confirming check of an invalid verdict the store
// holds back (catalog confirm_invalid) for revision rev, ConfirmSpacing
// from now; ok is false when c holds no confirmation of rev (the verdict
// was applied, or the state is invalid already). Its key (revision and
// step) makes one confirming check per step, however many tasks see it;
// the check index waits beyond it (dueCheck), so it is the only check.
func ConfirmTask(c *Connection, in *catalog.Integration, rev int64) (t Task, ok bool) {
	if in == nil || in.ConfirmInvalid <= 0 || c == nil || c.State == Invalid ||
		c.Confirmation.Invalids == 0 || c.Confirmation.Revision != rev {
		return Task{}, false
	}
	return Task{Type: tasks.TypeValidate, Ref: c.Ref(),
		Reason: tasks.ReasonConfirm, Delay: in.ConfirmSpacingOrDefault(),
		Key: "confirm-" + strconv.FormatInt(rev, 10) + "-" + strconv.Itoa(c.Confirmation.Invalids)}, true
}
