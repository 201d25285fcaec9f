package state

import (
	"context"
	_ "embed"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

//go:embed lua/reschedule_many.lua
var rescheduleManyLua string

var rescheduleManyScript = redis.NewScript(rescheduleManyLua)

// RescheduleBatch is Reschedule for many claims: one Lua call per shard
// instead of one per claim (the scheduler's sweep spends most of its Redis
// time on reschedules otherwise). next[i] is the next due time of
// claims[i]; a member that was written since its claim keeps the score the
// write gave it. It returns how many members were rescheduled.
func (s *Store) RescheduleBatch(ctx context.Context, idx Index, claims []Claim, next []time.Time) (int, error) {
	if len(claims) != len(next) {
		return 0, fmt.Errorf("state: reschedule batch: %d claims but %d next times", len(claims), len(next))
	}
	byShard := map[int][]any{}
	for i, c := range claims {
		if err := validateRef(c.Ref); err != nil {
			return 0, err
		}
		sh := shardOf(c.Ref.ConsumerID, s.cfg.Shards)
		byShard[sh] = append(byShard[sh], c.Ref.String(), c.Lease.UnixMilli(), next[i].UnixMilli())
	}
	total := 0
	for sh, args := range byShard {
		if err := s.checkIndex(idx, sh); err != nil {
			return total, err
		}
		n, err := rescheduleManyScript.Run(ctx, s.cfg.Client, []string{s.shardKeys(sh).due(idx)}, args...).Int()
		if err != nil {
			return total, fmt.Errorf("state: reschedule batch in %s shard %d: %w", idx, sh, err)
		}
		total += n
	}
	return total, nil
}
