package state

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// Reseal-all tuning.
const (
	// resealPage is how many index members one step reads (one ZRANGEBYLEX
	// and one pipelined HGET of their sealed values).
	resealPage = 500
	// resealWorkers reseal the records of one page that need it at once.
	resealWorkers = 8
	// resealContentionRetries: a record that keeps meeting concurrent
	// writes is tried this many times more before it is reported.
	resealContentionRetries = 3
)

// ResealProgress is where ResealAll stands; it is reported after every
// page and once at the end.
type ResealProgress struct {
	// Shard is the shard being walked, Shards how many there are.
	Shard, Shards int
	// Scanned counts the records looked at.
	Scanned int
	// Resealed counts the records sealed again under the primary key.
	Resealed int
	// Current counts the records already sealed under the primary key,
	// or without credentials, or rewritten by a concurrent write.
	Current int
	// Unreadable lists the records whose credentials cannot be opened
	// with the keyring (ids only).
	Unreadable []Ref
	// Failed lists the records that could not be resealed for another
	// reason (a Redis error, lasting contention).
	Failed []Ref
}

// ResealAll walks every shard's service indexes (never a SCAN) and
// seals again, under the keyring's primary key, the credentials of every
// record another key sealed (Reseal). It is safe while the fleet runs
// (each record is a compare-and-set write; a concurrent write wins and is
// looked at again) and cheap to run again: records already under the
// primary key cost one pipelined HGET, which is what makes an interrupted
// run resumable by running it again. progress, if not nil, is called after
// every page. The error is only for what stops the walk (a Redis error on
// the index, ctx done); records that cannot be opened or resealed are
// listed in the result.
func (s *Store) ResealAll(ctx context.Context, progress func(ResealProgress)) (ResealProgress, error) {
	p := ResealProgress{Shards: s.cfg.Shards}
	primary := s.cfg.Keys.PrimaryID()
	for sh := range s.cfg.Shards {
		p.Shard = sh
		k := s.shardKeys(sh)
		// Every connection is in exactly one service index. A service that
		// appears after this read holds only connections written since,
		// sealed under the primary key.
		svcs, err := s.shardServices(ctx, k)
		if err != nil {
			return p, fmt.Errorf("state: reseal: walk shard %d: %w", sh, err)
		}
		for _, svc := range svcs {
			if err := s.resealIndex(ctx, sh, k.service(svc), primary, &p, progress); err != nil {
				return p, err
			}
		}
	}
	if progress != nil {
		progress(p)
	}
	return p, nil
}

// resealIndex walks one lex index of shard sh and reseals what needs it.
func (s *Store) resealIndex(ctx context.Context, sh int, index, primary string, p *ResealProgress,
	progress func(ResealProgress)) error {
	k := s.shardKeys(sh)
	lo := "-"
	for {
		members, err := s.cfg.Client.ZRangeByLex(ctx, index, &redis.ZRangeBy{Min: lo, Max: "+", Count: resealPage}).Result()
		if err != nil {
			return fmt.Errorf("state: reseal: walk shard %d: %w", sh, err)
		}
		if len(members) == 0 {
			return nil
		}
		todo, err := s.needReseal(ctx, k, members, primary)
		if err != nil {
			return err
		}
		p.Scanned += len(members)
		p.Current += len(members) - len(todo)
		s.resealPage(ctx, todo, p)
		if err := ctx.Err(); err != nil {
			return err
		}
		if progress != nil {
			progress(*p)
		}
		if len(members) < resealPage {
			return nil
		}
		lo = "(" + members[len(members)-1]
	}
}

// needReseal reads the key id of each member's sealed credentials in one
// pipeline and returns the refs sealed under another key than primary
// (or too damaged to say).
func (s *Store) needReseal(ctx context.Context, k keys, members []string, primary string) ([]Ref, error) {
	pipe := s.cfg.Client.Pipeline()
	cmds := make([]*redis.StringCmd, len(members))
	for i, m := range members {
		cmds[i] = pipe.HGet(ctx, k.record(m), fieldCreds)
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("state: reseal: read sealed values: %w", err)
	}
	var out []Ref
	for i, m := range members {
		sealed, err := cmds[i].Bytes()
		if err != nil || len(sealed) == 0 {
			continue // gone, or no credentials
		}
		ref, ok := parseMember(m)
		if !ok {
			continue
		}
		if id, err := secrets.KeyID(sealed); err == nil && id == primary {
			continue
		}
		out = append(out, ref)
	}
	return out, nil
}

// resealPage reseals refs with a few workers and counts the outcomes in p.
func (s *Store) resealPage(ctx context.Context, refs []Ref, p *ResealProgress) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	work := make(chan Ref)
	for range min(resealWorkers, len(refs)) {
		wg.Go(func() {
			for ref := range work {
				resealed, err := s.resealOne(ctx, ref)
				mu.Lock()
				switch {
				case errors.Is(err, ErrUnreadable):
					p.Unreadable = append(p.Unreadable, ref)
				case err != nil:
					p.Failed = append(p.Failed, ref)
					s.cfg.Logger.WarnContext(ctx, "state: reseal failed", "connection", ref.String(), "error", err.Error())
				case resealed:
					p.Resealed++
				default:
					p.Current++
				}
				mu.Unlock()
			}
		})
	}
	for _, ref := range refs {
		if ctx.Err() != nil {
			break
		}
		work <- ref
	}
	close(work)
	wg.Wait()
}

// resealOne reseals one record, trying again a few times when concurrent
// writes keep winning.
func (s *Store) resealOne(ctx context.Context, ref Ref) (bool, error) {
	for attempt := 0; ; attempt++ {
		resealed, err := s.Reseal(ctx, ref)
		if !errors.Is(err, ErrContention) || attempt >= resealContentionRetries {
			return resealed, err
		}
	}
}
