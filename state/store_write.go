package state

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
)

//go:embed lua/write.lua
var writeLua string

var writeScript = redis.NewScript(writeLua)

//go:embed lua/touch.lua
var touchLua string

var touchScript = redis.NewScript(touchLua)

// Reasons the store puts on events it derives from consumer-side and
// token writes (verdict events carry the verdict's reason).
const (
	EventReasonCreated            = "created"
	EventReasonDeleted            = "deleted"
	EventReasonCredentialsChanged = "credentials_changed"
	EventReasonSettingsChanged    = "settings_changed"
	EventReasonEnabled            = "enabled"
	EventReasonDisabled           = "disabled"
	EventReasonMetadataChanged    = "metadata_changed"
	EventReasonTokenRefreshed     = "token_refreshed"
)

// hints tell the write machinery what kind of change a mutation made, for
// the events and due times it derives.
type hints struct {
	// reason goes on the events of this write.
	reason string
	// consumer: a consumer-side change of credentials, settings or enabled.
	consumer bool
	// verdict: ApplyVerdict; a state change reschedules the check at the
	// interval of the new state.
	verdict bool
	// confirm: an invalid result held for confirmation; the next check is
	// due after the integration's ConfirmSpacing.
	confirm bool
	// noop: nothing changed, write nothing.
	noop bool
	// reseal: seal the credentials again (under the primary key) even
	// though they did not change.
	reseal bool
	// replaceCreds: the mutation sets the credentials in full without
	// reading the stored ones, so it may run on a record whose
	// credentials cannot be opened (Unreadable).
	replaceCreds bool
}

// mutation builds the next connection from the current one (nil when there
// is no record; a private copy the function may change). It returns nil to
// delete, or an error that ends the write without writing.
type mutation func(cur *Connection, now time.Time) (*Connection, hints, error)

// write runs one optimistic read-modify-write: read the record, apply fn,
// derive state and health, events and due times, and write record, indexes,
// counts and events in one Lua call that compares and sets the version. A
// concurrent write of the same connection makes it read again and retry.
func (s *Store) write(ctx context.Context, ref Ref, in *catalog.Integration, seen *Connection, fn mutation) (Change, error) {
	return s.writeFenced(ctx, ref, in, seen, nil, fn)
}

// writeFenced is write under a refresh fence (nil: none): the script
// refuses the write with ErrFenced, never retried, once the fence is no
// longer the caller's.
func (s *Store) writeFenced(ctx context.Context, ref Ref, in *catalog.Integration, seen *Connection, f *fence, fn mutation) (Change, error) {
	k := s.keysOf(ref)
	for attempt := range maxAttempts {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				return Change{}, err
			}
		}
		var cur *Connection
		var err, unreadable error
		if attempt == 0 && seen != nil {
			// The caller's copy saves a read; if the record moved since,
			// the script's version check refuses the write and the next
			// attempt reads it.
			cur = seen.clone()
		} else if cur, err = s.read(ctx, ref); err != nil {
			var ue *UnreadableError
			if !errors.As(err, &ue) {
				return Change{}, err
			}
			// Credentials that cannot be opened: only a delete or a full
			// replacement of the credentials may go on (checked below).
			cur, unreadable = ue.Connection, err
		}
		pw, err := s.prepareWrite(ctx, k, ref, in, cur, unreadable, f, fn)
		if err != nil {
			return Change{}, err
		}
		if pw.noop {
			return Change{Before: cur, After: cur}, nil
		}
		ks, args, lean, next, events := pw.ks, pw.args, pw.lean, pw.next, pw.events
		var res []any
		acked := true
		if lean {
			res, err = touchScript.Run(ctx, s.cfg.Client, ks, args...).Slice()
		} else {
			res, acked, err = s.runWrite(ctx, f, ks, args)
		}
		if err != nil {
			return Change{}, fmt.Errorf("state: write connection %s: %w", ref, err)
		}
		if len(res) == 0 {
			return Change{}, fmt.Errorf("state: write connection %s: empty reply", ref)
		}
		if ok, _ := res[0].(int64); ok == -1 {
			return Change{}, fmt.Errorf("%w: %s", ErrFenced, ref)
		} else if ok == 1 && !acked {
			return Change{}, fmt.Errorf("%w: %s (%d needed)", ErrNotReplicated, ref, s.cfg.AckReplicas)
		} else if ok != 1 {
			s.cfg.Logger.DebugContext(ctx, "state: write conflict, retrying",
				slog.String("connection", ref.String()), slog.Int("attempt", attempt+1))
			continue
		}
		s.eventsWritten(ctx, events, res)
		return Change{Before: cur, After: next, Events: events}, nil
	}
	return Change{}, fmt.Errorf("%w: %s after %d attempts", ErrContention, ref, maxAttempts)
}

// preparedWrite is one attempt of a write, ready to send: the keys and
// arguments of write.lua, or of touch.lua when lean.
type preparedWrite struct {
	ks     []string
	args   []any
	lean   bool
	noop   bool
	next   *Connection
	events []Event
}

// prepareWrite applies fn to cur (as read; unreadable is the error of
// credentials that could not be opened) and lays out the write.
func (s *Store) prepareWrite(ctx context.Context, k keys, ref Ref, in *catalog.Integration, cur *Connection, unreadable error,
	f *fence, fn mutation) (preparedWrite, error) {
	now := s.now()
	next, h, err := fn(cur.clone(), now)
	if err != nil {
		return preparedWrite{}, err
	}
	if unreadable != nil && next != nil && !h.replaceCreds {
		return preparedWrite{}, unreadable
	}
	if h.noop {
		if f != nil && !s.acked(ctx) {
			// Stored by our own earlier attempt, but on a master whose
			// replicas have not confirmed it (maybe one about to be
			// demoted): not stored yet as far as a failover goes.
			return preparedWrite{}, fmt.Errorf("%w: %s (%d needed)", ErrNotReplicated, ref, s.cfg.AckReplicas)
		}
		return preparedWrite{noop: true}, nil
	}
	if next != nil {
		s.finish(cur, next, in, ref, now)
	}
	events := s.deriveEvents(cur, next, h, now)
	ks, args, lean, err := s.scriptArgs(k, ref, in, cur, next, h, events, now, f)
	if err != nil {
		return preparedWrite{}, err
	}
	return preparedWrite{ks: ks, args: args, lean: lean, next: next, events: events}, nil
}

// runWrite runs write.lua. A fenced write (refreshed tokens, a
// revocation) with Config.AckReplicas > 0 is followed by WAIT on the same
// connection; acked reports whether enough replicas confirmed it.
func (s *Store) runWrite(ctx context.Context, f *fence, ks []string, args []any) (res []any, acked bool, err error) {
	if f == nil {
		res, err = writeScript.Run(ctx, s.cfg.Client, ks, args...).Slice()
		return res, true, err
	}
	return s.evalAcked(ctx, writeScript, ks, args, func(p redis.Pipeliner) *redis.Cmd {
		return p.Eval(ctx, writeLua, ks, args...)
	})
}

// evalAcked runs script with keys ks and args and, with
// Config.AckReplicas > 0 (not on a cluster), WAIT on the same connection
// (WAIT counts the replicas that have this connection's writes): eval
// queues the script's EVAL (its source) on that pipeline. acked reports
// whether enough replicas confirmed it.
func (s *Store) evalAcked(ctx context.Context, script *redis.Script, ks []string, args []any, eval func(redis.Pipeliner) *redis.Cmd) (res []any, acked bool, err error) {
	if s.cfg.AckReplicas <= 0 || s.cluster {
		res, err = script.Run(ctx, s.cfg.Client, ks, args...).Slice()
		return res, true, err
	}
	timeout := s.cfg.AckTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	pipe := s.cfg.Client.Pipeline()
	ev := eval(pipe)
	wait := pipe.Do(ctx, "wait", s.cfg.AckReplicas, timeout.Milliseconds())
	if _, err := pipe.Exec(ctx); err != nil && ev.Err() != nil {
		return nil, false, ev.Err()
	}
	if res, err = ev.Slice(); err != nil {
		return nil, false, err
	}
	n, err := wait.Int64()
	return res, err == nil && n >= int64(s.cfg.AckReplicas), nil
}

// acked reports whether Config.AckReplicas replicas have caught up with
// the master this client now talks to (true when none are asked for).
func (s *Store) acked(ctx context.Context) bool {
	if s.cfg.AckReplicas <= 0 || s.cluster {
		return true
	}
	timeout := s.cfg.AckTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	n, err := s.cfg.Client.Do(ctx, "wait", s.cfg.AckReplicas, timeout.Milliseconds()).Int64()
	return err == nil && n >= int64(s.cfg.AckReplicas)
}

// scriptArgs lays out the keys and arguments of write.lua (documented
// there) for the change from cur to next (nil: delete); or, when lean, of
// touch.lua: a change of the data field alone (same state, service and
// credentials, no event, no fence), which needs no index, count or stream
// work, like most check results.
func (s *Store) scriptArgs(k keys, ref Ref, in *catalog.Integration, cur, next *Connection, h hints,
	events []Event, now time.Time, f *fence) (ks []string, args []any, lean bool, err error) {
	member := ref.String()
	recKey := k.record(member)
	expected := "0"
	if cur != nil {
		expected = strconv.FormatInt(cur.Version, 10)
	}
	if next == nil {
		ks = []string{recKey, k.service(cur.ServiceID), k.state(cur.State), k.state(cur.State)}
		args = append(make([]any, 0, 16+len(events)*25), expected, "d", member, "", "", string(cur.State),
			cur.ServiceID, "", "k", "", dueRemove, 0, dueRemove, 0)
		return s.writeScriptArgs(k, ref, ks, args, events, f)
	}
	data, err := encodeData(next)
	if err != nil {
		return nil, nil, false, fmt.Errorf("state: connection %s: encode: %v", ref, err)
	}
	credMode, sealed := "k", []byte(nil)
	if cur == nil || h.reseal || cur.Unreadable || !sameCredentials(cur.Credentials, next.Credentials) {
		// An unreadable value is always replaced or dropped: the mutation
		// set the credentials in full.
		next.Unreadable = false
		switch {
		case next.Credentials.hasAny():
			if sealed, err = sealCreds(s.cfg.Keys, recKey, next.Credentials); err != nil {
				return nil, nil, false, fmt.Errorf("state: connection %s: encode credentials", ref)
			}
			credMode, next.CredentialsKeyID = "s", s.cfg.Keys.PrimaryID()
		case cur != nil:
			credMode, next.CredentialsKeyID = "d", ""
		}
	}
	checkMode, checkAt := dueCheck(cur, next, in, h, now)
	refreshMode, refreshAt := dueRefresh(cur, next, in)
	if f == nil && cur != nil && len(events) == 0 && credMode == "k" &&
		cur.State == next.State && cur.ServiceID == next.ServiceID {
		return []string{recKey, k.due(IndexCheck), k.due(IndexRefresh)},
			[]any{expected, strconv.FormatInt(next.Version, 10), data, member,
				checkMode, ms(checkAt), refreshMode, ms(refreshAt)}, true, nil
	}
	oldState, oldStateKey := "", k.state(next.State)
	if cur != nil {
		oldState, oldStateKey = string(cur.State), k.state(cur.State)
	}
	ks = []string{recKey, k.service(next.ServiceID), oldStateKey, k.state(next.State)}
	args = append(make([]any, 0, 16+len(events)*25), expected, "s", member, strconv.FormatInt(next.Version, 10),
		string(next.State), oldState, next.ServiceID, data, credMode, sealed,
		checkMode, ms(checkAt), refreshMode, ms(refreshAt))
	return s.writeScriptArgs(k, ref, ks, args, events, f)
}

// writeScriptArgs completes the keys (record and the service and state
// indexes given) and arguments of write.lua: the shard's counts, due sets
// and the refresh fence's keys, the fence, and the events.
func (s *Store) writeScriptArgs(k keys, ref Ref, ks []string, args []any, events []Event, f *fence) ([]string, []any, bool, error) {
	lock, intent := s.fenceKeys(ref)
	ks = append(ks, k.counts(), k.due(IndexCheck), k.due(IndexRefresh), lock, intent)
	args = append(args, s.cfg.EventMaxLen, len(events))
	switch {
	case f == nil:
		args = append(args, "", "", "")
	case f.needLock:
		args = append(args, "L", f.lease.token, "1")
	default:
		args = append(args, "I", f.lease.token, "1")
	}
	ks, args = s.eventScriptArgs(ks, args, events)
	return ks, args, false, nil
}

// backoff sleeps a random time that grows with the attempt (at most 10ms).
func backoff(ctx context.Context, attempt int) error {
	const floor = 50 * time.Microsecond
	return retry.Sleep(ctx, retry.Between(floor, floor+retry.Exp(attempt, 100*time.Microsecond, 10*time.Millisecond)))
}

// finish fills what every write sets: identity, version, times, and the
// derived state and health.
func (s *Store) finish(cur, next *Connection, in *catalog.Integration, ref Ref, now time.Time) {
	next.ID, next.ConsumerID = ref.ConnectionID, ref.ConsumerID
	next.UnifiedAPI, next.ServiceID, _ = SplitConnectionID(ref.ConnectionID)
	next.UpdatedAt = now
	if cur == nil {
		// Version and revision start at the creation time in unix ms, not
		// at 1: a connection deleted and added again never repeats a
		// version or revision of its predecessor, so neither an If-Match
		// nor a verdict computed for the old record applies to the new one.
		initial := max(now.UnixMilli(), 1)
		next.Version, next.Revision, next.CreatedAt = initial, initial, now
	} else {
		next.Version = cur.Version + 1
	}
	if in != nil {
		next.State, next.Health = Derive(next, in, now)
	}
}

// sameCredentials compares credentials including IssuedAt (Equal leaves
// it out: it does not make credentials different, but it is stored).
func sameCredentials(a, b Credentials) bool { return a.Equal(b) && a.IssuedAt.Equal(b.IssuedAt) }

// integration resolves the catalog entry of a connection id.
func (s *Store) integration(connectionID string) (*catalog.Integration, error) {
	api, svc, ok := SplitConnectionID(connectionID)
	if !ok {
		return nil, fmt.Errorf("state: connection %s: %w", connectionID, catalog.ErrUnknownIntegration)
	}
	in, err := s.cfg.Catalog.Lookup(api, svc)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return in, nil
}
