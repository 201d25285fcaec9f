package state

import (
	"context"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/tasks"
)

// Consumers are a small record per consumer id (the caller's metadata,
// created and modified times) and a per-shard index of consumer ids, both
// under the consumer's shard hash tag, next to its connections:
//
//	<prefix>:{sNN}:consumer:<consumer>   hash: md (metadata JSON), ca, ma (unix ms)
//	<prefix>:{sNN}:consumers             lex zset of consumer ids
//
// A consumer's connections do not need a record: connections written
// through /v1 exist without one. DeleteConsumer removes the record, the
// index entry and every connection of the consumer in one atomic step.

//go:embed lua/consumer.lua
var consumerLua string

//go:embed lua/consumer_delete.lua
var consumerDeleteLua string

var (
	consumerScript       = redis.NewScript(consumerLua)
	consumerDeleteScript = redis.NewScript(consumerDeleteLua)
)

// ErrConsumerNotFound means there is no consumer record (and, for
// DeleteConsumer, no connection either).
var ErrConsumerNotFound = errors.New("state: consumer not found")

// ErrConsumerExists means CreateConsumer found the consumer already present.
var ErrConsumerExists = errors.New("state: consumer already exists")

// Consumer is the record of one consumer.
type Consumer struct {
	ID string
	// Metadata is the caller's JSON object, nil when none.
	Metadata  json.RawMessage
	CreatedAt time.Time
	// ModifiedAt is the time of the last write of the record.
	ModifiedAt time.Time
}

func (k keys) consumer(id string) string { return k.tag + "consumer:" + id }
func (k keys) consumers() string         { return k.tag + "consumers" }

const (
	consumerOpCreate = "c"
	consumerOpUpdate = "u"
	consumerOpEnsure = "e"
)

// CreateConsumer adds a consumer record (ErrConsumerExists if present).
// metadata is a JSON object or nil.
func (s *Store) CreateConsumer(ctx context.Context, id string, metadata json.RawMessage) (*Consumer, error) {
	c, _, err := s.writeConsumerRecord(ctx, consumerOpCreate, id, metadata, true)
	return c, err
}

// UpdateConsumer replaces the metadata of an existing consumer
// (ErrConsumerNotFound otherwise); nil metadata keeps it, JSON null
// clears it.
func (s *Store) UpdateConsumer(ctx context.Context, id string, metadata json.RawMessage) (*Consumer, error) {
	c, _, err := s.writeConsumerRecord(ctx, consumerOpUpdate, id, metadata, metadata != nil)
	return c, err
}

// EnsureConsumer creates the consumer record if there is none and reports
// whether it did; an existing record is left alone.
func (s *Store) EnsureConsumer(ctx context.Context, id string) (bool, error) {
	_, created, err := s.writeConsumerRecord(ctx, consumerOpEnsure, id, nil, false)
	return created, err
}

func (s *Store) writeConsumerRecord(ctx context.Context, op, id string, metadata json.RawMessage, setMeta bool) (*Consumer, bool, error) {
	if !tasks.ValidConsumerID(id) {
		return nil, false, validateRef(Ref{ConsumerID: id})
	}
	meta, err := checkMetadata(metadata)
	if err != nil {
		return nil, false, err
	}
	k := s.keysOf(Ref{ConsumerID: id})
	set := "0"
	if setMeta {
		set = "1"
	}
	res, err := consumerScript.Run(ctx, s.cfg.Client, []string{k.consumer(id), k.consumers()},
		op, id, string(meta), s.now().UnixMilli(), set).Slice()
	if err != nil {
		return nil, false, fmt.Errorf("state: write consumer: %w", err)
	}
	status, _ := res[0].(int64)
	switch {
	case status == 2:
		return nil, false, nil
	case status == 0 && op == consumerOpCreate:
		return nil, false, ErrConsumerExists
	case status == 0:
		return nil, false, ErrConsumerNotFound
	case len(res) != 4:
		return nil, false, fmt.Errorf("state: write consumer: unexpected reply")
	}
	str := func(i int) string { v, _ := res[i].(string); return v }
	c := &Consumer{ID: id, CreatedAt: msString(str(2)), ModifiedAt: msString(str(3))}
	if md := str(1); md != "" {
		c.Metadata = json.RawMessage(md)
	}
	return c, true, nil
}

func msString(v string) time.Time {
	n, _ := strconv.ParseInt(v, 10, 64)
	return fromMS(n)
}

// GetConsumer returns a consumer record (ErrConsumerNotFound if none).
func (s *Store) GetConsumer(ctx context.Context, id string) (*Consumer, error) {
	if !tasks.ValidConsumerID(id) {
		return nil, validateRef(Ref{ConsumerID: id})
	}
	vals, err := s.cfg.Client.HMGet(ctx, s.keysOf(Ref{ConsumerID: id}).consumer(id), "md", "ca", "ma").Result()
	if err != nil {
		return nil, fmt.Errorf("state: read consumer: %w", err)
	}
	return decodeConsumer(id, vals)
}

func decodeConsumer(id string, vals []any) (*Consumer, error) {
	if len(vals) != 3 || vals[1] == nil {
		return nil, ErrConsumerNotFound
	}
	str := func(i int) string { v, _ := vals[i].(string); return v }
	c := &Consumer{ID: id, CreatedAt: msString(str(1)), ModifiedAt: msString(str(2))}
	if md := str(0); md != "" {
		c.Metadata = json.RawMessage(md)
	}
	return c, nil
}

// ListConsumers returns up to limit consumer records whose id starts with
// prefix ("" for all), after cursor ("" for the first page), and the cursor
// of the next page ("" at the end). Like List, a consumer that exists for
// the whole walk is returned exactly once.
func (s *Store) ListConsumers(ctx context.Context, prefix, cur string, limit int) ([]*Consumer, string, error) {
	switch {
	case limit <= 0:
		limit = DefaultListLimit
	case limit > MaxListLimit:
		limit = MaxListLimit
	}
	start := cursor{}
	if cur != "" {
		var err error
		if start, err = s.decodeConsumerCursor(cur); err != nil {
			return nil, "", err
		}
	}
	lo0, hi := "-", "+"
	if prefix != "" {
		// Consumer ids are ASCII: 0xff sorts after every id with the prefix.
		lo0, hi = "["+prefix, "("+prefix+"\xff"
	}
	out := make([]*Consumer, 0, min(limit, 64))
	for sh := start.shard; sh < s.cfg.Shards; sh++ {
		k := s.shardKeys(sh)
		lo := lo0
		if sh == start.shard && start.member != "" {
			lo = "(" + start.member
		}
		for {
			ids, err := s.cfg.Client.ZRangeByLex(ctx, k.consumers(), &redis.ZRangeBy{Min: lo, Max: hi,
				Count: int64(limit - len(out))}).Result()
			if err != nil {
				return nil, "", fmt.Errorf("state: list consumers: %w", err)
			}
			if len(ids) == 0 {
				break
			}
			pipe := s.cfg.Client.Pipeline()
			cmds := make([]*redis.SliceCmd, len(ids))
			for i, id := range ids {
				cmds[i] = pipe.HMGet(ctx, k.consumer(id), "md", "ca", "ma")
			}
			if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
				return nil, "", fmt.Errorf("state: list consumers: %w", err)
			}
			for i, id := range ids {
				c, err := decodeConsumer(id, cmds[i].Val())
				if err != nil {
					continue // deleted between the index read and the record read
				}
				out = append(out, c)
				if len(out) == limit {
					return out, cursor{shard: sh, member: id}.encode(), nil
				}
			}
			lo = "(" + ids[len(ids)-1]
		}
	}
	return out, "", nil
}

func (s *Store) decodeConsumerCursor(v string) (cursor, error) {
	bad := &FieldError{Field: "cursor", Msg: "malformed or from another listing"}
	raw, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return cursor{}, bad
	}
	// cursor.encode's layout: "<version>:<shard>:<svc>:<member>", svc
	// empty for consumers.
	parts := strings.SplitN(string(raw), ":", 4)
	if len(parts) != 4 || parts[0] != cursorV2 || parts[2] != "" {
		return cursor{}, bad
	}
	n, err := strconv.Atoi(parts[1])
	if err != nil || n < 0 || n >= s.cfg.Shards || !tasks.ValidConsumerID(parts[3]) {
		return cursor{}, bad
	}
	return cursor{shard: n, member: parts[3]}, nil
}

// DeleteConsumer removes the consumer record, its index entry and every
// connection of the consumer (records, indexes, due entries, counts and
// credentials) in one atomic step, appending a deleted event per
// connection. ErrConsumerNotFound when there is neither a record nor a
// connection. It returns the changes of the deleted connections.
func (s *Store) DeleteConsumer(ctx context.Context, id string) ([]Change, error) {
	if !tasks.ValidConsumerID(id) {
		return nil, validateRef(Ref{ConsumerID: id})
	}
	k := s.keysOf(Ref{ConsumerID: id})
	for attempt := range maxAttempts {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				return nil, err
			}
		}
		svcs, conns, err := s.consumerConnections(ctx, k, id, "delete consumer")
		if err != nil {
			return nil, err
		}
		if len(conns) == 0 {
			n, err := s.cfg.Client.Exists(ctx, k.consumer(id)).Result()
			if err != nil {
				return nil, fmt.Errorf("state: delete consumer: %w", err)
			}
			if n == 0 {
				return nil, ErrConsumerNotFound
			}
		}
		now := s.now()
		// The script checks that the shard holds no service beyond svcs
		// and no connection of the consumer beyond conns.
		ks := []string{k.consumer(id), k.consumers(), k.counts(), k.due(IndexCheck), k.due(IndexRefresh)}
		args := []any{id, len(conns), len(svcs)}
		for _, svc := range svcs {
			ks = append(ks, k.service(svc))
			args = append(args, svc)
		}
		var events []Event
		changes := make([]Change, 0, len(conns))
		for _, c := range conns {
			m := c.Ref().String()
			ks = append(ks, k.record(m), k.service(c.ServiceID), k.state(c.State))
			args = append(args, m, strconv.FormatInt(c.Version, 10), string(c.State), c.ServiceID)
			ev := s.deriveEvents(c, nil, hints{reason: EventReasonDeleted, consumer: true}, now)
			events = append(events, ev...)
			changes = append(changes, Change{Before: c, Events: ev})
		}
		args = append(args, s.cfg.EventMaxLen, len(events))
		ks, args = s.eventScriptArgs(ks, args, events)
		res, err := consumerDeleteScript.Run(ctx, s.cfg.Client, ks, args...).Slice()
		if err != nil {
			return nil, fmt.Errorf("state: delete consumer: %w", err)
		}
		if ok, _ := res[0].(int64); ok != 1 {
			continue // a connection was written meanwhile: read again
		}
		s.eventsWritten(ctx, events, res)
		// Change.Events share events' backing array: give them their ids.
		i := 0
		for j := range changes {
			n := len(changes[j].Events)
			changes[j].Events = events[i : i+n]
			i += n
		}
		return changes, nil
	}
	return nil, fmt.Errorf("%w: consumer %s after %d attempts", ErrContention, id, maxAttempts)
}
