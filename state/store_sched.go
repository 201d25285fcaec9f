package state

import (
	"context"
	_ "embed"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

var (
	//go:embed lua/claim_peek.lua
	claimPeekLua string
	//go:embed lua/claim.lua
	claimLua string

	claimPeekScript = redis.NewScript(claimPeekLua)
	claimScript     = redis.NewScript(claimLua)
)

func (s *Store) checkIndex(idx Index, shard int) error {
	if idx != IndexCheck && idx != IndexRefresh {
		return fmt.Errorf("state: unknown due index %q", idx)
	}
	if shard < 0 || shard >= s.cfg.Shards {
		return fmt.Errorf("state: shard %d out of range 0..%d", shard, s.cfg.Shards-1)
	}
	return nil
}

// claimDue claims in two steps, so that every script declares every key
// it touches (Redis Cluster refuses undeclared keys while a slot
// migrates; Dragonfly always does): claim_peek.lua lists due members,
// claim.lua claims those still due with their record keys in KEYS. A zero
// now means the Redis server's TIME.
func (s *Store) claimDue(ctx context.Context, idx Index, shard int, now time.Time, lease time.Duration, max int) ([]Claim, error) {
	if err := s.checkIndex(idx, shard); err != nil {
		return nil, err
	}
	if max <= 0 {
		return nil, nil
	}
	if lease <= 0 {
		return nil, fmt.Errorf("state: claim lease must be positive, got %v", lease)
	}
	k := s.shardKeys(shard)
	at := ""
	if !now.IsZero() {
		at = strconv.FormatInt(now.UnixMilli(), 10)
	}
	peek, err := claimPeekScript.Run(ctx, s.cfg.Client, []string{k.due(idx)}, at, max).StringSlice()
	if err != nil {
		return nil, fmt.Errorf("state: claim due %s shard %d: %w", idx, shard, err)
	}
	if len(peek) < 2 {
		return nil, nil
	}
	members := peek[1:]
	keys := make([]string, 1, 1+len(members))
	keys[0] = k.due(idx)
	args := make([]any, 2, 2+len(members))
	// The claim runs at the peek's time, so that a member listed as due
	// is still due (TIME differs between nodes after a failover).
	args[0], args[1] = peek[0], lease.Milliseconds()
	for _, m := range members {
		keys = append(keys, k.record(m))
		args = append(args, m)
	}
	res, err := claimScript.Run(ctx, s.cfg.Client, keys, args...).StringSlice()
	if err != nil {
		return nil, fmt.Errorf("state: claim due %s shard %d: %w", idx, shard, err)
	}
	if len(res) < 2 {
		return nil, fmt.Errorf("state: claim due %s shard %d: malformed reply", idx, shard)
	}
	atMS, err1 := strconv.ParseInt(res[0], 10, 64)
	leaseMS, err2 := strconv.ParseInt(res[1], 10, 64)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("state: claim due %s shard %d: malformed reply", idx, shard)
	}
	out := make([]Claim, 0, (len(res)-2)/4)
	for i := 2; i+3 < len(res); i += 4 {
		ref, ok := parseMember(res[i])
		if !ok {
			continue
		}
		score, err := strconv.ParseFloat(res[i+1], 64)
		if err != nil {
			return nil, fmt.Errorf("state: claim due %s shard %d: malformed score", idx, shard)
		}
		out = append(out, Claim{Ref: ref, Due: scoreTime(score), Lease: time.UnixMilli(leaseMS).UTC(),
			At: time.UnixMilli(atMS).UTC(), ServiceID: res[i+2], State: State(res[i+3])})
	}
	return out, nil
}

func scoreTime(score float64) time.Time {
	return time.UnixMilli(int64(math.Round(score))).UTC()
}

// reschedule reports whether the member was rescheduled (false: a write
// since the claim moved or removed it, and wins).
func (s *Store) reschedule(ctx context.Context, idx Index, c Claim, next time.Time) (bool, error) {
	if err := validateRef(c.Ref); err != nil {
		return false, err
	}
	shard := shardOf(c.Ref.ConsumerID, s.cfg.Shards)
	if err := s.checkIndex(idx, shard); err != nil {
		return false, err
	}
	n, err := rescheduleManyScript.Run(ctx, s.cfg.Client, []string{s.shardKeys(shard).due(idx)},
		c.Ref.String(), c.Lease.UnixMilli(), next.UnixMilli()).Int()
	if err != nil {
		return false, fmt.Errorf("state: reschedule %s in %s: %w", c.Ref, idx, err)
	}
	return n == 1, nil
}

// RescheduleClaim is Reschedule that also says whether the member was
// rescheduled (false: a write since the claim moved or removed it).
func (s *Store) RescheduleClaim(ctx context.Context, idx Index, c Claim, next time.Time) (bool, error) {
	return s.reschedule(ctx, idx, c, next)
}

func (s *Store) oldestDue(ctx context.Context, idx Index, now time.Time) (time.Time, bool, error) {
	if err := s.checkIndex(idx, 0); err != nil {
		return time.Time{}, false, err
	}
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.ZSliceCmd, s.cfg.Shards)
	maxScore := strconv.FormatInt(now.UnixMilli(), 10)
	for i := range cmds {
		cmds[i] = pipe.ZRangeByScoreWithScores(ctx, s.shardKeys(i).due(idx),
			&redis.ZRangeBy{Min: "-inf", Max: maxScore, Count: 1})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return time.Time{}, false, fmt.Errorf("state: oldest due %s: %w", idx, err)
	}
	best, ok := math.Inf(1), false
	for _, cmd := range cmds {
		if z := cmd.Val(); len(z) > 0 && z[0].Score < best {
			best, ok = z[0].Score, true
		}
	}
	if !ok {
		return time.Time{}, false, nil
	}
	return scoreTime(best), true, nil
}

// DueAt returns the score of a connection in a due index (for tests and
// operators); ok is false when it is not in the index.
func (s *Store) DueAt(ctx context.Context, idx Index, ref Ref) (t time.Time, ok bool, err error) {
	shard := shardOf(ref.ConsumerID, s.cfg.Shards)
	if err := s.checkIndex(idx, shard); err != nil {
		return time.Time{}, false, err
	}
	score, err := s.cfg.Client.ZScore(ctx, s.shardKeys(shard).due(idx), ref.String()).Result()
	if err == redis.Nil {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, fmt.Errorf("state: due time of %s: %w", ref, err)
	}
	return scoreTime(score), true, nil
}
