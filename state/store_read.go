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
	keys := make([]string, len(members))
	for i, m := range members {
		keys[i] = k.record(m)
	}
	vals, err := s.readRecords(ctx, keys)
	if err != nil {
		return nil, err
	}
	out := make([]*Connection, len(members))
	for i, m := range members {
		ref, ok := parseMember(m)
		if !ok {
			continue
		}
		c, err := s.decodeFields(ref, keys[i], vals[i])
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

// readRecords reads the records at keys (of any shards) in one pipeline:
// each one's recordFields, as HMGET gives them ("" keys are skipped).
func (s *Store) readRecords(ctx context.Context, keys []string) ([][]any, error) {
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.SliceCmd, len(keys))
	for i, key := range keys {
		if key != "" {
			cmds[i] = pipe.HMGet(ctx, key, recordFields...)
		}
	}
	if pipe.Len() > 0 {
		if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
			return nil, fmt.Errorf("state: read connections: %w", err)
		}
	}
	out := make([][]any, len(keys))
	for i, cmd := range cmds {
		if cmd != nil {
			out[i] = cmd.Val()
		}
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
	_, conns, err := s.consumerConnections(ctx, s.keysOf(Ref{ConsumerID: consumerID}), consumerID,
		"list connections of a consumer")
	return conns, err
}

// consumerConnections reads every stored connection of one consumer,
// sorted by id, and the services of its shard they were looked for in
// (see consumerMembers); what names the caller's step in errors.
func (s *Store) consumerConnections(ctx context.Context, k keys, consumerID, what string) ([]string, []*Connection, error) {
	svcs, err := s.shardServices(ctx, k)
	if err != nil {
		return nil, nil, fmt.Errorf("state: %s: %w", what, err)
	}
	members, err := s.consumerMembers(ctx, k, consumerID, svcs)
	if err != nil {
		return nil, nil, fmt.Errorf("state: %s: %w", what, err)
	}
	conns, err := s.fetch(ctx, k, members)
	if err != nil {
		return nil, nil, err
	}
	return svcs, slices.DeleteFunc(conns, func(c *Connection) bool { return c == nil }), nil
}

// consumerMembers returns the index members of one consumer's
// connections, sorted: its lex range in the index of each of svcs, the
// services of the shard (every connection is in exactly one).
func (s *Store) consumerMembers(ctx context.Context, k keys, consumerID string, svcs []string) ([]string, error) {
	if len(svcs) == 0 {
		return nil, nil
	}
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.StringSliceCmd, len(svcs))
	for i, svc := range svcs {
		// '}' follows '|': the range holds exactly the members "<consumer>|...".
		cmds[i] = pipe.ZRangeByLex(ctx, k.service(svc), &redis.ZRangeBy{
			Min: "[" + consumerID + "|", Max: "(" + consumerID + "}"})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return nil, err
	}
	var members []string
	for _, cmd := range cmds {
		members = append(members, cmd.Val()...)
	}
	slices.Sort(members)
	return members, nil
}

// shardServices returns the services that have connections in a shard,
// sorted: the services named by the fields "<service_id>|<state>" of its
// counts hash, which every write keeps in the same script as the indexes.
func (s *Store) shardServices(ctx context.Context, k keys) ([]string, error) {
	counts, err := s.cfg.Client.HGetAll(ctx, k.counts()).Result()
	if err != nil {
		return nil, err
	}
	return servicesIn(counts), nil
}

// servicesIn returns the services named by the fields of a counts hash,
// sorted.
func servicesIn(counts map[string]string) []string {
	svcs := make([]string, 0, len(counts))
	for field := range counts {
		if svc, _, ok := strings.Cut(field, "|"); ok && !slices.Contains(svcs, svc) {
			svcs = append(svcs, svc)
		}
	}
	slices.Sort(svcs)
	return svcs
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
	svc string // the service whose index this is; "" for a state index
	// exact: every member of the index matches the filter.
	exact bool
}

// listPlan says which indexes List walks in each shard, narrowest first:
// the state index for a state alone; the index of every service stored in
// the shard, one after the other in service order, without a filter (there
// is no index of all connections); the smaller of a service's index and
// the state index for service_id with state; the indexes of the unified
// API's services (from the catalog, plus any service stored but no longer
// in the catalog) for unified_api. Shards and services whose counters hold
// no match are skipped without a read.
func (s *Store) listPlan(ctx context.Context, f Filter) (func(sh int) []walk, error) {
	if f.ServiceID == "" && f.UnifiedAPI == "" && f.State != "" {
		return func(sh int) []walk {
			return []walk{{key: s.shardKeys(sh).state(f.State), exact: true}}
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
	if f.UnifiedAPI != "" {
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
		// No filter: every service of the shard. unified_api: the
		// catalog's services of that API, and any stored service the
		// catalog no longer knows (its API is unknown here).
		var out []walk
		for _, svc := range servicesIn(counts[sh]) {
			if inAPI != nil {
				if _, known := s.cfg.Catalog.Get(svc); !inAPI[svc] && known {
					continue
				}
			}
			if count(sh, svc, f.State) > 0 {
				out = append(out, walk{key: k.service(svc), svc: svc, exact: inAPI == nil})
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
	l := lister{s: s, f: f, limit: limit, out: make([]*Connection, 0, limit)}
	for sh := start.shard; sh < s.cfg.Shards; sh++ {
		walks := plan(sh)
		if sh == start.shard && start.svc == "" && start.member != "" {
			// A position in the shard's lex order (a walk through one
			// index, or a cursor of a release that walked the index of
			// all connections): the rest of the shard in that order.
			next, done, err := l.merged(ctx, sh, walks, start.member)
			switch {
			case err != nil:
				return nil, "", err
			case done:
				return l.out, next, nil
			}
			continue
		}
		for _, w := range walks {
			lo := "-"
			if sh == start.shard && cur != "" {
				switch {
				case w.svc < start.svc:
					continue // walked on an earlier page
				case w.svc == start.svc && start.member != "":
					lo = "(" + start.member
				}
			}
			next, done, err := l.walk(ctx, sh, w, lo)
			switch {
			case err != nil:
				return nil, "", err
			case done:
				return l.out, next, nil
			}
		}
	}
	return l.out, "", nil
}

// lister is one page of List.
type lister struct {
	s        *Store
	f        Filter
	limit    int
	out      []*Connection
	examined int
}

// cursorAt is the cursor of a page that ends in walk w of shard sh after
// the index range lo ("-" for the walk's start).
func cursorAt(sh int, svc, lo string) string {
	after := ""
	if lo != "-" {
		after = strings.TrimPrefix(lo, "(")
	}
	return cursor{shard: sh, svc: svc, member: after}.encode()
}

// add reads the records of members and keeps the matches; the page is
// full (cursor after the last one kept) when it returns a cursor.
func (l *lister) add(ctx context.Context, sh int, svc string, members []string) (string, error) {
	conns, err := l.s.fetch(ctx, l.s.shardKeys(sh), members)
	if err != nil {
		return "", err
	}
	l.examined += len(members)
	for i, c := range conns {
		if c != nil && l.f.matches(c) {
			l.out = append(l.out, c)
			if len(l.out) == l.limit {
				return cursor{shard: sh, svc: svc, member: members[i]}.encode(), nil
			}
		}
	}
	return "", nil
}

// batch is how many index members one read asks for.
func (l *lister) batch(exact bool) int {
	if exact {
		return l.limit
	}
	return max(l.limit, listMinBatch)
}

// walk reads index w of shard sh from lo on; done when the page is full
// or its budget spent (next is then its cursor) or on an error.
func (l *lister) walk(ctx context.Context, sh int, w walk, lo string) (next string, done bool, err error) {
	batch := l.batch(w.exact)
	for {
		if l.examined >= listScanBudget {
			// Enough work for one page: the caller continues here.
			return cursorAt(sh, w.svc, lo), true, nil
		}
		// Walking the lex order of a zset member by member from the last
		// one seen is what keeps the walk exact under concurrent writes:
		// positions do not shift when other members come and go.
		members, err := l.s.cfg.Client.ZRangeByLex(ctx, w.key, &redis.ZRangeBy{Min: lo, Max: "+",
			Count: int64(batch)}).Result()
		if err != nil {
			return "", true, fmt.Errorf("state: list connections: %w", err)
		}
		if len(members) == 0 {
			return "", false, nil
		}
		if next, err := l.add(ctx, sh, w.svc, members); err != nil || next != "" {
			return next, true, err
		}
		if len(members) < batch {
			return "", false, nil
		}
		lo = "(" + members[len(members)-1]
	}
}

// merged reads the rest of shard sh after member in lex order, merging
// its walks (their indexes are disjoint, or the one walk a position in
// lex order came from); its cursors are positions in that order too.
func (l *lister) merged(ctx context.Context, sh int, walks []walk, after string) (next string, done bool, err error) {
	exact := true
	for _, w := range walks {
		exact = exact && w.exact
	}
	batch := l.batch(exact)
	lo := "(" + after
	for len(walks) > 0 {
		if l.examined >= listScanBudget {
			return cursorAt(sh, "", lo), true, nil
		}
		// The first batch members of the union are among the first batch
		// of each index.
		pipe := l.s.cfg.Client.Pipeline()
		cmds := make([]*redis.StringSliceCmd, len(walks))
		for i, w := range walks {
			cmds[i] = pipe.ZRangeByLex(ctx, w.key, &redis.ZRangeBy{Min: lo, Max: "+", Count: int64(batch)})
		}
		if _, err := pipe.Exec(ctx); err != nil {
			return "", true, fmt.Errorf("state: list connections: %w", err)
		}
		var members []string
		full := false
		for _, cmd := range cmds {
			members = append(members, cmd.Val()...)
			full = full || len(cmd.Val()) == batch
		}
		if len(members) == 0 {
			return "", false, nil
		}
		slices.Sort(members)
		members = slices.Compact(members)
		if len(members) > batch {
			members = members[:batch]
		}
		if next, err := l.add(ctx, sh, "", members); err != nil || next != "" {
			return next, true, err
		}
		if !full {
			return "", false, nil
		}
		lo = "(" + members[len(members)-1]
	}
	return "", false, nil
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

// Got is one connection of GetMany, read but not yet decoded: Open
// decodes it (and opens its credentials) when the caller gets to it, so a
// batch holds its members' stored bytes, not their decoded credentials.
type Got struct {
	s    *Store
	ref  Ref
	key  string
	vals []any
	err  error
}

// Open returns the connection exactly as Get would: the connection,
// ErrNotFound, an *UnreadableError or a bad ref's error.
func (g Got) Open() (*Connection, error) {
	if g.err != nil {
		return nil, g.err
	}
	if g.s == nil {
		return nil, ErrNotFound
	}
	c, err := g.s.decodeFields(g.ref, g.key, g.vals)
	switch {
	case err != nil:
		return nil, err
	case c == nil:
		return nil, ErrNotFound
	}
	return c, nil
}

// GetMany reads the connections of refs, of any shards, in one pipeline:
// what a batch of checks reads in one round trip instead of one per
// connection. out[i] is refs[i]'s; err is set only when Redis could not
// be read.
func (s *Store) GetMany(ctx context.Context, refs []Ref) ([]Got, error) {
	out := make([]Got, len(refs))
	keys := make([]string, len(refs))
	for i, ref := range refs {
		if err := validateRef(ref); err != nil {
			out[i].err = err
			continue
		}
		keys[i] = s.keysOf(ref).record(ref.String())
	}
	vals, err := s.readRecords(ctx, keys)
	if err != nil {
		return nil, err
	}
	for i, ref := range refs {
		if keys[i] != "" {
			out[i] = Got{s: s, ref: ref, key: keys[i], vals: vals[i]}
		}
	}
	return out, nil
}
