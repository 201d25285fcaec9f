package state

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrNoGroup means the consumer group (or the stream) does not exist: it
// was never created, or the stream was deleted since. Create it again.
var ErrNoGroup = errors.New("state: no such consumer group")

// EventStream is the state-change stream as its followers read it: one
// entry by id, and a consumer group's reads, claims and
// acknowledgements. The store appends to it (Config.EventStream); this
// type never writes an event. Safe for concurrent use.
type EventStream struct {
	client redis.UniversalClient
	stream string
}

// NewEventStream returns the stream named stream (DefaultEventStream if
// empty) on client.
func NewEventStream(client redis.UniversalClient, stream string) *EventStream {
	if stream == "" {
		stream = DefaultEventStream
	}
	return &EventStream{client: client, stream: stream}
}

// StreamEntry is one entry of the stream as read: its id and its fields
// as written. Entry.Event parses those the store wrote.
type StreamEntry struct {
	ID     string
	Values map[string]any
}

// Event parses an entry the store wrote (see ParseEvent).
func (e StreamEntry) Event() (Event, error) {
	return ParseEvent(redis.XMessage{ID: e.ID, Values: e.Values})
}

// GroupConsumer is one consumer of a group.
type GroupConsumer struct {
	Name string
	// Pending is how many entries it read and did not acknowledge.
	Pending int64
	// Idle is how long since it last read.
	Idle time.Duration
}

// Entry returns the entry with id; ok is false when the stream no longer
// holds it (trimmed by MAXLEN) or holds it emptied.
func (s *EventStream) Entry(ctx context.Context, id string) (e StreamEntry, ok bool, err error) {
	msgs, err := s.client.XRange(ctx, s.stream, id, id).Result()
	if err != nil {
		return StreamEntry{}, false, fmt.Errorf("state: read event %s: %w", id, err)
	}
	if len(msgs) == 0 || len(msgs[0].Values) == 0 {
		return StreamEntry{}, false, nil
	}
	return entries(msgs)[0], true, nil
}

// CreateGroup creates group, and the stream if missing, starting at start
// ("0": every entry the stream holds, "$": only new ones). A group that
// exists already is left as it is.
func (s *EventStream) CreateGroup(ctx context.Context, group, start string) error {
	err := s.client.XGroupCreateMkStream(ctx, s.stream, group, start).Err()
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		return fmt.Errorf("state: create group %s: %w", group, err)
	}
	return nil
}

// ReadGroup reads up to count entries for consumer of group after id: ">"
// for entries never delivered to the group (waiting up to block for
// some; zero does not wait), "0" for the consumer's own unacknowledged
// ones. No entry is not an error. ErrNoGroup if the group is missing.
func (s *EventStream) ReadGroup(ctx context.Context, group, consumer, id string, count int64, block time.Duration) ([]StreamEntry, error) {
	args := &redis.XReadGroupArgs{Group: group, Consumer: consumer,
		Streams: []string{s.stream, id}, Count: count, Block: -1}
	if block > 0 {
		args.Block = block
	}
	res, err := s.client.XReadGroup(ctx, args).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, groupErr("xreadgroup", err)
	}
	var out []StreamEntry
	for _, st := range res {
		out = append(out, entries(st.Messages)...)
	}
	return out, nil
}

// ClaimIdle hands consumer up to count entries of group that others read
// and left unacknowledged for at least minIdle, scanning from start
// ("0-0" at first). It returns them and where the next scan starts ("0-0"
// once the whole pending list was scanned).
func (s *EventStream) ClaimIdle(ctx context.Context, group, consumer string, minIdle time.Duration, start string, count int64) ([]StreamEntry, string, error) {
	msgs, next, err := s.client.XAutoClaim(ctx, &redis.XAutoClaimArgs{
		Stream: s.stream, Group: group, Consumer: consumer,
		MinIdle: minIdle, Start: start, Count: count,
	}).Result()
	if err != nil {
		return nil, "", groupErr("xautoclaim", err)
	}
	return entries(msgs), next, nil
}

// Ack acknowledges entries of group.
func (s *EventStream) Ack(ctx context.Context, group string, ids ...string) error {
	if err := s.client.XAck(ctx, s.stream, group, ids...).Err(); err != nil {
		return groupErr("xack", err)
	}
	return nil
}

// Consumers lists the consumers of group.
func (s *EventStream) Consumers(ctx context.Context, group string) ([]GroupConsumer, error) {
	cs, err := s.client.XInfoConsumers(ctx, s.stream, group).Result()
	if err != nil {
		return nil, groupErr("xinfo consumers", err)
	}
	out := make([]GroupConsumer, len(cs))
	for i, c := range cs {
		out[i] = GroupConsumer{Name: c.Name, Pending: c.Pending, Idle: c.Idle}
	}
	return out, nil
}

// DeleteConsumer removes consumer from group (its pending entries with it:
// call it for consumers with none).
func (s *EventStream) DeleteConsumer(ctx context.Context, group, consumer string) error {
	if err := s.client.XGroupDelConsumer(ctx, s.stream, group, consumer).Err(); err != nil {
		return groupErr("xgroup delconsumer", err)
	}
	return nil
}

// groupErr wraps a Redis error of a group command, marking a missing
// group or stream ErrNoGroup.
func groupErr(cmd string, err error) error {
	if strings.HasPrefix(err.Error(), "NOGROUP") {
		return fmt.Errorf("state: %s: %w: %w", cmd, ErrNoGroup, err)
	}
	return fmt.Errorf("state: %s: %w", cmd, err)
}

func entries(msgs []redis.XMessage) []StreamEntry {
	out := make([]StreamEntry, len(msgs))
	for i, m := range msgs {
		out[i] = StreamEntry{ID: m.ID, Values: m.Values}
	}
	return out
}
