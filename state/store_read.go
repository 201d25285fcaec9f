package state

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/tasks"
)

var recordFields = []string{fieldVersion, fieldState, fieldService, fieldData, fieldCreds}

// read returns the stored connection, nil when there is none.
func (s *Store) read(ctx context.Context, ref Ref) (*Connection, error) {
	key := s.keysOf(ref).record(ref.String())
	vals, err := s.cfg.Client.HMGet(ctx, key, recordFields...).Result()
	if err != nil {
		return nil, fmt.Errorf("state: read connection %s: %w", ref, err)
	}
	return s.decodeFields(ref, key, vals)
}

// decodeFields decodes an HMGET of recordFields; nil when the record is
// absent.
func (s *Store) decodeFields(ref Ref, key string, vals []any) (*Connection, error) {
	if len(vals) != len(recordFields) || vals[0] == nil {
		return nil, nil
	}
	str := func(i int) string {
		v, _ := vals[i].(string)
		return v
	}
	var sealed []byte
	if c := str(4); c != "" {
		sealed = []byte(c)
	}
	return s.decodeRecord(ref, key, str(0), str(1), str(2), []byte(str(3)), sealed)
}

// fetch reads the records of members of one shard in one pipeline; a
// member whose record is gone gives nil, one whose credentials cannot be
// opened a connection marked Unreadable.
func (s *Store) fetch(ctx context.Context, k keys, members []string) ([]*Connection, error) {
	if len(members) == 0 {
		return nil, nil
	}
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.SliceCmd, len(members))
	for i, m := range members {
		cmds[i] = pipe.HMGet(ctx, k.record(m), recordFields...)
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("state: read connections: %w", err)
	}
	out := make([]*Connection, len(members))
	for i, m := range members {
		ref, ok := parseMember(m)
		if !ok {
			continue
		}
		c, err := s.decodeFields(ref, k.record(m), cmds[i].Val())
		var ue *UnreadableError
		switch {
		case errors.As(err, &ue):
			// One record whose credentials cannot be opened does not take
			// the listing down: it is listed with its non-secret facts and
			// marked Unreadable.
			s.cfg.Logger.DebugContext(ctx, "state: listing a connection whose credentials cannot be opened",
				slog.String("connection", ref.String()), slog.String("key_id", ue.KeyID))
		case err != nil:
			return nil, err
		}
		out[i] = c
	}
	return out, nil
}

// parseMember splits an index member "<consumer>|<connection>".
func parseMember(m string) (Ref, bool) {
	consumer, conn, ok := strings.Cut(m, "|")
	return Ref{ConsumerID: consumer, ConnectionID: conn}, ok
}

func (s *Store) listConsumer(ctx context.Context, consumerID string) ([]*Connection, error) {
	if !tasks.ValidConsumerID(consumerID) {
		return nil, validateRef(Ref{ConsumerID: consumerID})
	}
	k := s.keysOf(Ref{ConsumerID: consumerID})
	// '}' follows '|': the range holds exactly the members "<consumer>|...".
	members, err := s.cfg.Client.ZRangeByLex(ctx, k.all(), &redis.ZRangeBy{
		Min: "[" + consumerID + "|", Max: "(" + consumerID + "}"}).Result()
	if err != nil {
		return nil, fmt.Errorf("state: list connections of a consumer: %w", err)
	}
	conns, err := s.fetch(ctx, k, members)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(conns, func(c *Connection) bool { return c == nil }), nil
}

// cursor is a position in the walk of List: after member of shard.
type cursor struct {
	shard  int
	member string
}

const cursorVersion = "1"

func (c cursor) encode() string {
	return base64.RawURLEncoding.EncodeToString([]byte(cursorVersion + ":" + strconv.Itoa(c.shard) + ":" + c.member))
}

func (s *Store) decodeCursor(v string) (cursor, error) {
	bad := &FieldError{Field: "cursor", Msg: "malformed or from another listing"}
	raw, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return cursor{}, bad
	}
	parts := strings.SplitN(string(raw), ":", 3)
	if len(parts) != 3 || parts[0] != cursorVersion {
		return cursor{}, bad
	}
	n, err := strconv.Atoi(parts[1])
	if err != nil || n < 0 || n >= s.cfg.Shards {
		return cursor{}, bad
	}
	ref, ok := parseMember(parts[2])
	if !ok || validateRef(ref) != nil {
		return cursor{}, bad
	}
	return cursor{shard: n, member: parts[2]}, nil
}

func (s *Store) list(ctx context.Context, f Filter, cur string, limit int) ([]*Connection, string, error) {
	switch {
	case limit <= 0:
		limit = DefaultListLimit
	case limit > MaxListLimit:
		limit = MaxListLimit
	}
	if f.State != "" && !slices.Contains(States, f.State) {
		return nil, "", &FieldError{Field: "state", Msg: "unknown state"}
	}
	start := cursor{}
	if cur != "" {
		var err error
		if start, err = s.decodeCursor(cur); err != nil {
			return nil, "", err
		}
	}
	out := make([]*Connection, 0, limit)
	for sh := start.shard; sh < s.cfg.Shards; sh++ {
		k := s.shardKeys(sh)
		idx := k.all()
		switch {
		case f.ServiceID != "":
			idx = k.service(f.ServiceID)
		case f.State != "":
			idx = k.state(f.State)
		}
		lo := "-"
		if sh == start.shard && start.member != "" {
			lo = "(" + start.member
		}
		for {
			// Walking the lex order of a zset member by member from the last
			// one seen is what keeps the walk exact under concurrent writes:
			// positions do not shift when other members come and go.
			members, err := s.cfg.Client.ZRangeByLex(ctx, idx, &redis.ZRangeBy{Min: lo, Max: "+",
				Count: int64(limit)}).Result()
			if err != nil {
				return nil, "", fmt.Errorf("state: list connections: %w", err)
			}
			if len(members) == 0 {
				break
			}
			conns, err := s.fetch(ctx, k, members)
			if err != nil {
				return nil, "", err
			}
			for i, c := range conns {
				if c != nil && f.matches(c) {
					out = append(out, c)
					if len(out) == limit {
						return out, cursor{shard: sh, member: members[i]}.encode(), nil
					}
				}
			}
			if len(members) < limit {
				break
			}
			lo = "(" + members[len(members)-1]
		}
	}
	return out, "", nil
}

// matches applies the filter to a record read after its index entry.
func (f Filter) matches(c *Connection) bool {
	return (f.State == "" || c.State == f.State) &&
		(f.ServiceID == "" || c.ServiceID == f.ServiceID) &&
		(f.UnifiedAPI == "" || c.UnifiedAPI == f.UnifiedAPI)
}

func (s *Store) counts(ctx context.Context) (map[CountKey]int64, error) {
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, s.cfg.Shards)
	for i := range cmds {
		cmds[i] = pipe.HGetAll(ctx, s.shardKeys(i).counts())
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("state: read counts: %w", err)
	}
	out := map[CountKey]int64{}
	for _, cmd := range cmds {
		for field, v := range cmd.Val() {
			svc, st, ok := strings.Cut(field, "|")
			n, err := strconv.ParseInt(v, 10, 64)
			if !ok || err != nil {
				continue
			}
			out[CountKey{ServiceID: svc, State: State(st)}] += n
		}
	}
	for k, n := range out {
		if n == 0 {
			delete(out, k)
		}
	}
	return out, nil
}
