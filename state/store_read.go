package state

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"maps"
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

// ListConsumer returns every stored connection of one consumer, sorted by
// id. A connection whose credentials cannot be opened is listed marked
// Unreadable (empty Credentials, stored State and Health) rather than
// failing the listing; so does List.
func (s *Store) ListConsumer(ctx context.Context, consumerID string) ([]*Connection, error) {
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

// cursor is a position in the walk of List: in shard, in the walk of the
// index of service svc ("" when the shard is walked through one index),
// after member ("" for the walk's start).
type cursor struct {
	shard  int
	svc    string
	member string
}

// Cursor versions: "1:<shard>:<member>" (older releases, still read: svc
// empty) and "2:<shard>:<svc>:<member>".
const (
	cursorV1 = "1"
	cursorV2 = "2"
)

func (c cursor) encode() string {
	return base64.RawURLEncoding.EncodeToString([]byte(cursorV2 + ":" + strconv.Itoa(c.shard) + ":" + c.svc + ":" + c.member))
}

func (s *Store) decodeCursor(v string) (cursor, error) {
	bad := &FieldError{Field: "cursor", Msg: "malformed or from another listing"}
	raw, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return cursor{}, bad
	}
	var c cursor
	var shard string
	switch ver, rest, _ := strings.Cut(string(raw), ":"); ver {
	case cursorV1:
		parts := strings.SplitN(rest, ":", 2)
		if len(parts) != 2 || parts[1] == "" {
			return cursor{}, bad
		}
		shard, c.member = parts[0], parts[1]
	case cursorV2:
		parts := strings.SplitN(rest, ":", 3)
		if len(parts) != 3 {
			return cursor{}, bad
		}
		shard, c.svc, c.member = parts[0], parts[1], parts[2]
		if c.svc != "" && !tasks.ValidConnectionID("x+"+c.svc) {
			return cursor{}, bad
		}
	default:
		return cursor{}, bad
	}
	n, err := strconv.Atoi(shard)
	if err != nil || n < 0 || n >= s.cfg.Shards {
		return cursor{}, bad
	}
	c.shard = n
	if c.member != "" {
		ref, ok := parseMember(c.member)
		if !ok || validateRef(ref) != nil {
			return cursor{}, bad
		}
	}
	return c, nil
}

// List bounds: the work of one page is bounded, whatever the filter and
// the fleet's size.
const (
	// listScanBudget is how many records one List call reads at most
	// (plus one batch): past it, the page ends early (perhaps empty) with
	// a cursor, and the caller continues from there.
	listScanBudget = 1000
	// listMinBatch is the smallest batch of index members read at once
	// when the index walked holds more than the filter matches, so that a
	// selective filter with a small limit does not cost one range read
	// per record.
	listMinBatch = 100
)

// walk is one index a shard's listing walks.
type walk struct {
	key string
	svc string // the service whose index this is; "" for the all and state indexes
	// exact: every member of the index matches the filter.
	exact bool
}

// listPlan says which indexes List walks in each shard, narrowest first:
// the all index or a state index without a service filter; the smaller
// of a service's index and the state index for service_id with state; the
// indexes of the unified API's services (from the catalog, plus any
// service stored but no longer in the catalog) for unified_api. Shards
// and services whose counters hold no match are skipped without a read.
func (s *Store) listPlan(ctx context.Context, f Filter) (func(sh int) []walk, error) {
	if f.ServiceID == "" && f.UnifiedAPI == "" {
		return func(sh int) []walk {
			k := s.shardKeys(sh)
			if f.State != "" {
				return []walk{{key: k.state(f.State), exact: true}}
			}
			return []walk{{key: k.all(), exact: true}}
		}, nil
	}
	// The per-shard counters (kept in the same script as every write)
	// say which services have matches where.
	counts := make([]map[string]string, s.cfg.Shards)
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, s.cfg.Shards)
	for i := range cmds {
		cmds[i] = pipe.HGetAll(ctx, s.shardKeys(i).counts())
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, fmt.Errorf("state: list connections: %w", err)
	}
	for i, cmd := range cmds {
		counts[i] = cmd.Val()
	}
	count := func(sh int, svc string, st State) (n int64) {
		for field, v := range counts[sh] {
			fs, fst, ok := strings.Cut(field, "|")
			if !ok || (svc != "" && fs != svc) || (st != "" && State(fst) != st) {
				continue
			}
			c, _ := strconv.ParseInt(v, 10, 64)
			n += c
		}
		return n
	}
	var inAPI map[string]bool
	if f.ServiceID == "" {
		inAPI = map[string]bool{}
		for _, in := range s.cfg.Catalog.ByUnifiedAPI(f.UnifiedAPI) {
			inAPI[in.ID] = true
		}
	}
	return func(sh int) []walk {
		k := s.shardKeys(sh)
		if f.ServiceID != "" {
			if count(sh, f.ServiceID, f.State) == 0 {
				return nil
			}
			w := walk{key: k.service(f.ServiceID), svc: f.ServiceID, exact: f.State == "" && f.UnifiedAPI == ""}
			if f.State != "" && count(sh, "", f.State) < count(sh, f.ServiceID, "") {
				w.key = k.state(f.State)
			}
			return []walk{w}
		}
		// unified_api: the catalog's services of that API, and any stored
		// service the catalog no longer knows (its API is unknown here).
		svcs := map[string]bool{}
		for field := range counts[sh] {
			svc, _, ok := strings.Cut(field, "|")
			if !ok {
				continue
			}
			if _, known := s.cfg.Catalog.Get(svc); inAPI[svc] || !known {
				svcs[svc] = true
			}
		}
		var out []walk
		for _, svc := range slices.Sorted(maps.Keys(svcs)) {
			if count(sh, svc, f.State) > 0 {
				out = append(out, walk{key: k.service(svc), svc: svc})
			}
		}
		return out
	}, nil
}

// List returns up to limit connections matching f, starting after cursor
// ("" for the first page), and the cursor of the next page ("" at the end).
// A connection that exists for the whole walk and keeps matching is
// returned exactly once, whatever is written meanwhile.
func (s *Store) List(ctx context.Context, f Filter, cur string, limit int) ([]*Connection, string, error) {
	switch {
	case limit <= 0:
		limit = DefaultListLimit
	case limit > MaxListLimit:
		limit = MaxListLimit
	}
	if f.State != "" && !slices.Contains(States(), f.State) {
		return nil, "", &FieldError{Field: "state", Msg: "unknown state"}
	}
	start := cursor{}
	if cur != "" {
		var err error
		if start, err = s.decodeCursor(cur); err != nil {
			return nil, "", err
		}
	}
	plan, err := s.listPlan(ctx, f)
	if err != nil {
		return nil, "", err
	}
	out := make([]*Connection, 0, limit)
	examined := 0
	for sh := start.shard; sh < s.cfg.Shards; sh++ {
		k := s.shardKeys(sh)
		for _, w := range plan(sh) {
			lo := "-"
			if sh == start.shard && cur != "" {
				switch {
				case start.svc == "" && start.member != "":
					// One walk through the shard's lex order (or a v1
					// cursor, which walked it that way): every index
					// resumes after the member.
					lo = "(" + start.member
				case w.svc < start.svc:
					continue // walked on an earlier page
				case w.svc == start.svc && start.member != "":
					lo = "(" + start.member
				}
			}
			batch := limit
			if !w.exact {
				batch = max(limit, listMinBatch)
			}
			for {
				if examined >= listScanBudget {
					// Enough work for one page: the caller continues here.
					return out, cursor{shard: sh, svc: w.svc, member: strings.TrimPrefix(lo, "(")}.encode(), nil
				}
				// Walking the lex order of a zset member by member from the
				// last one seen is what keeps the walk exact under
				// concurrent writes: positions do not shift when other
				// members come and go.
				members, err := s.cfg.Client.ZRangeByLex(ctx, w.key, &redis.ZRangeBy{Min: lo, Max: "+",
					Count: int64(batch)}).Result()
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
				examined += len(members)
				for i, c := range conns {
					if c != nil && f.matches(c) {
						out = append(out, c)
						if len(out) == limit {
							return out, cursor{shard: sh, svc: w.svc, member: members[i]}.encode(), nil
						}
					}
				}
				if len(members) < batch {
					break
				}
				lo = "(" + members[len(members)-1]
			}
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

// Counts returns the number of connections per integration and state, from
// counters kept with every write (never a SCAN).
func (s *Store) Counts(ctx context.Context) (map[CountKey]int64, error) {
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

// Got is one connection of GetMany: C, or Err exactly as Get would return
// it (ErrNotFound, an *UnreadableError, a bad ref).
type Got struct {
	C   *Connection
	Err error
}

// GetMany reads the connections of refs, of any shards, in one pipeline:
// what a batch of checks reads in one round trip instead of one per
// connection. out[i] is refs[i]'s; err is set only when Redis could not
// be read.
func (s *Store) GetMany(ctx context.Context, refs []Ref) ([]Got, error) {
	out := make([]Got, len(refs))
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.SliceCmd, len(refs))
	for i, ref := range refs {
		if err := validateRef(ref); err != nil {
			out[i].Err = err
			continue
		}
		cmds[i] = pipe.HMGet(ctx, s.keysOf(ref).record(ref.String()), recordFields...)
	}
	if pipe.Len() > 0 {
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("state: read connections: %w", err)
		}
	}
	for i, ref := range refs {
		if cmds[i] == nil {
			continue
		}
		c, err := s.decodeFields(ref, s.keysOf(ref).record(ref.String()), cmds[i].Val())
		switch {
		case err != nil:
			out[i].Err = err
		case c == nil:
			out[i].Err = ErrNotFound
		default:
			out[i].C = c
		}
	}
	return out, nil
}
