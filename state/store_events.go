package state

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/vaultfleet/vaultfleet/internal/retry"
)

// Events are appended to Config.EventStream in the same Lua call as the
// write, so a state change and its event are one atomic step. On Redis
// Cluster the stream lives in another slot than the record, so the events
// are appended right after the write, detached from the caller's context
// and retried: only a crash between the two, or Redis refusing every
// attempt for appendTimeout, loses those events (never the write); that
// is logged and counted in vaultfleet_events_lost_total.

// deriveEvents computes the events of a write from before and after.
func (s *Store) deriveEvents(cur, next *Connection, h hints, now time.Time) []Event {
	switch {
	case cur == nil && next == nil:
		return nil
	case cur == nil:
		e := newEvent(EventCreated, next, now)
		e.StateAfter, e.HealthAfter, e.Reason = next.State, next.Health, h.reason
		return []Event{e}
	case next == nil:
		e := newEvent(EventDeleted, cur, now)
		e.StateBefore, e.HealthBefore, e.Reason = cur.State, cur.Health, h.reason
		return []Event{e}
	}
	var out []Event
	add := func(typ, reason string) {
		e := newEvent(typ, next, now)
		e.StateBefore, e.StateAfter = cur.State, next.State
		e.HealthBefore, e.HealthAfter = cur.Health, next.Health
		e.Reason = reason
		out = append(out, e)
	}
	if cur.Enabled && !next.Enabled {
		add(EventDisabled, EventReasonDisabled)
	}
	if cur.State != next.State {
		switch {
		case next.State == Callable:
			add(EventCallable, h.reason)
		case next.State == Invalid && next.Health == HealthRevoked:
			add(EventRevoked, h.reason)
		case next.State == Invalid:
			add(EventInvalid, h.reason)
		}
	}
	switch {
	case cur.Refresh.Failures == 0 && next.Refresh.Failures > 0:
		add(EventTokenRefreshFailed, next.Refresh.LastError)
	case cur.Refresh.Failures > 0 && next.Refresh.Failures == 0:
		add(EventTokenRefreshRecovered, h.reason)
	}
	switch {
	case !providerTrouble(cur) && providerTrouble(next):
		add(EventDownstreamDegraded, next.Transient.LastError)
	case providerTrouble(cur) && !providerTrouble(next):
		add(EventDownstreamRecovered, h.reason)
	}
	if len(out) == 0 && (cur.State != next.State || cur.Health != next.Health || h.consumer) {
		add(EventUpdated, h.reason)
	}
	return out
}

// providerTrouble reports whether c's failed checks announce provider
// trouble (downstream.degraded): not when the failures are the consumer's
// own misconfiguration, and not while c is invalid (its health says
// needs_auth whatever the provider does; a held or failed re-check of an
// invalid connection tells its subscribers nothing new).
func providerTrouble(c *Connection) bool {
	return c.Transient.Failures > 0 && !c.Transient.Misconfigured && c.State != Invalid
}

func newEvent(typ string, c *Connection, now time.Time) Event {
	return Event{Type: typ, ConnectionID: c.ID, ConsumerID: c.ConsumerID, ServiceID: c.ServiceID,
		UnifiedAPI: c.UnifiedAPI, Version: c.Version, Time: now}
}

// eventFields lays an event out as stream field/value pairs; empty values
// are left out.
func eventFields(e Event) []string {
	f := make([]string, 0, 24)
	put := func(k, v string) {
		if v != "" {
			f = append(f, k, v)
		}
	}
	put("type", e.Type)
	put("connection_id", e.ConnectionID)
	put("consumer_id", e.ConsumerID)
	put("service_id", e.ServiceID)
	put("unified_api", e.UnifiedAPI)
	put("state_before", string(e.StateBefore))
	put("state_after", string(e.StateAfter))
	put("health_before", string(e.HealthBefore))
	put("health_after", string(e.HealthAfter))
	put("reason", e.Reason)
	put("version", strconv.FormatInt(e.Version, 10))
	put("time", e.Time.UTC().Format(time.RFC3339Nano))
	return f
}

// eventScriptArgs adds a write's events to the keys and arguments of a
// script that appends them in its own step (write.lua, consumer_delete.lua):
// the stream key unless on Redis Cluster (where they are appended after
// the write, see appendEvents), then per event its field count and fields.
func (s *Store) eventScriptArgs(ks []string, args []any, events []Event) ([]string, []any) {
	if !s.cluster && len(events) > 0 {
		ks = append(ks, s.cfg.EventStream)
	}
	for _, e := range events {
		f := eventFields(e)
		args = append(args, len(f))
		for _, v := range f {
			args = append(args, v)
		}
	}
	return ks, args
}

// eventsWritten completes the events of a script's committed write: on one
// Redis the script appended them and res holds {1, stream ids...}, which
// become their IDs; on Redis Cluster they are appended now (appendEvents).
func (s *Store) eventsWritten(ctx context.Context, events []Event, res []any) {
	if s.cluster {
		s.appendEvents(ctx, events)
		return
	}
	for i := range events {
		if i+1 < len(res) {
			events[i].ID, _ = res[i+1].(string)
		}
	}
}

// Event appends after the write (Redis Cluster).
const (
	// appendTimeout bounds all attempts to append one write's events.
	appendTimeout = 15 * time.Second
	// appendAttempts is how often one event's XADD is tried.
	appendAttempts = 6
)

// appendEvents appends events outside the write (Redis Cluster). The write
// is committed: the append never depends on the caller's context (a client
// that went away must not lose the event), has its own deadline, and
// retries with backoff; a final failure is logged and counted
// (vaultfleet_events_lost_total).
func (s *Store) appendEvents(ctx context.Context, events []Event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), appendTimeout)
	defer cancel()
	for i, e := range events {
		f := eventFields(e)
		vals := make([]any, len(f))
		for j, v := range f {
			vals[j] = v
		}
		var err error
		for attempt := range appendAttempts {
			if attempt > 0 {
				if err = retry.Sleep(ctx, appendBackoff(attempt)); err != nil {
					break
				}
			}
			var id string
			id, err = s.cfg.Client.XAdd(ctx, &redis.XAddArgs{Stream: s.cfg.EventStream, MaxLen: s.cfg.EventMaxLen,
				Approx: true, Values: vals}).Result()
			if err == nil {
				events[i].ID = id
				break
			}
		}
		if err != nil {
			s.eventsLost.Inc()
			s.cfg.Logger.ErrorContext(ctx, "state: event lost: append to stream failed after the write",
				slog.String("event_type", e.Type), slog.String("connection", e.ConsumerID+"|"+e.ConnectionID),
				slog.Int64("version", e.Version), slog.String("error", err.Error()))
		}
	}
}

// appendBackoff is 50ms doubling per attempt, at most 2s.
func appendBackoff(attempt int) time.Duration {
	return retry.Exp(attempt-1, 50*time.Millisecond, 2*time.Second)
}

// ReadEvents returns up to count stream entries after id ("0" or "" from the
// start), for tests and followers that do not use consumer groups.
func (s *Store) ReadEvents(ctx context.Context, afterID string, count int64) ([]Event, error) {
	start := "-"
	if afterID != "" && afterID != "0" && afterID != "0-0" {
		start = "(" + afterID
	}
	var (
		msgs []redis.XMessage
		err  error
	)
	if count > 0 {
		msgs, err = s.cfg.Client.XRangeN(ctx, s.cfg.EventStream, start, "+", count).Result()
	} else {
		msgs, err = s.cfg.Client.XRange(ctx, s.cfg.EventStream, start, "+").Result()
	}
	if err != nil {
		return nil, fmt.Errorf("state: read events: %w", err)
	}
	return parseEvents(msgs)
}

// parseEvents parses stream entries in the order given.
func parseEvents(msgs []redis.XMessage) ([]Event, error) {
	out := make([]Event, 0, len(msgs))
	for _, m := range msgs {
		e, err := ParseEvent(m)
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// ParseEvent reads one stream entry of the event stream (for followers
// that read the stream with their own consumer group).
func ParseEvent(m redis.XMessage) (Event, error) {
	str := func(k string) string {
		v, _ := m.Values[k].(string)
		return v
	}
	e := Event{ID: m.ID, Type: str("type"), ConnectionID: str("connection_id"), ConsumerID: str("consumer_id"),
		ServiceID: str("service_id"), UnifiedAPI: str("unified_api"),
		StateBefore: State(str("state_before")), StateAfter: State(str("state_after")),
		HealthBefore: Health(str("health_before")), HealthAfter: Health(str("health_after")),
		Reason: str("reason")}
	if e.Type == "" {
		return Event{}, fmt.Errorf("state: event %s: no type", m.ID)
	}
	if v := str("version"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return Event{}, fmt.Errorf("state: event %s: malformed version", m.ID)
		}
		e.Version = n
	}
	if v := str("time"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return Event{}, fmt.Errorf("state: event %s: malformed time", m.ID)
		}
		e.Time = t
	}
	return e, nil
}
