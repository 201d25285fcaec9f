package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/monitor"
	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// fleetKey marks a Redis as a vaultfleet fleet's: every worker, scheduler,
// serve and dev process records its start there (field: process name,
// value: RFC 3339 time), and `vaultfleet enqueue` refuses a Redis without
// it, which is most likely not the fleet's.
const fleetKey = "vaultfleet:fleet"

// fleetShardsKey records the fleet's index shard count (decimal): the
// first process that starts sets it (SET NX), every later one compares its
// own. Connections are indexed by shard, so a process with another count
// would look them up in the wrong sets.
const fleetShardsKey = fleetKey + ":shards"

// announceTimeout bounds the start-up writes of announceFleet.
const announceTimeout = 5 * time.Second

// announceFleet records the fleet's shard count when none is recorded,
// marks rdb as the fleet's and registers the fleet's queues with asynq, so
// the monitor lists all of them from the start. It returns an error,
// and writes nothing, when the fleet records another shard count than
// shards (a *shardMismatchError). A Redis that does not answer is logged, not fatal:
// the process still starts and waits for Redis as it would without them
// (the shard count is then checked at its next start).
func announceFleet(ctx context.Context, rdb redis.UniversalClient, process string, shards int, logger *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, announceTimeout)
	defer cancel()
	err := recordShards(ctx, rdb, shards)
	if errors.Is(err, errShardsUnreachable) {
		logger.Warn("cannot check the fleet's shard count in Redis", slog.String("error", err.Error()))
	} else if err != nil {
		return err
	}
	queues := make([]string, 0, len(tasks.Queues()))
	for q := range tasks.Queues() {
		queues = append(queues, q)
	}
	slices.Sort(queues)
	err = monitor.RegisterQueues(ctx, rdb, queues...)
	if err == nil {
		err = rdb.HSet(ctx, fleetKey, process, time.Now().UTC().Format(time.RFC3339)).Err()
	}
	if err != nil {
		logger.Warn("cannot register the fleet's queues in Redis", slog.String("error", err.Error()))
	}
	return nil
}

// errShardsUnreachable means Redis did not answer the shard count check.
var errShardsUnreachable = errors.New("redis did not answer")

// shardMismatchError means the fleet's Redis records another index shard
// count than the process was started with.
type shardMismatchError struct {
	have, recorded int
}

func (e *shardMismatchError) Error() string {
	return fmt.Sprintf("this process has %d index shards but the fleet's Redis records %d (key %s, set by the fleet's first process): "+
		"start it with %s=%d (or --shards %d) like the rest of the fleet; "+
		"the count cannot change while the Redis holds connections (delete %s only on a Redis that holds none)",
		e.have, e.recorded, fleetShardsKey, envShards, e.recorded, e.recorded, fleetShardsKey)
}

// recordShards records n as the fleet's shard count unless one is
// recorded, then checks it like checkShards.
func recordShards(ctx context.Context, rdb redis.UniversalClient, n int) error {
	if err := rdb.SetNX(ctx, fleetShardsKey, strconv.Itoa(n), 0).Err(); err != nil {
		return fmt.Errorf("record the fleet's shard count: %w: %v", errShardsUnreachable, err)
	}
	return checkShards(ctx, rdb, n)
}

// checkShards returns a *shardMismatchError when the fleet's Redis records
// another shard count than n; none recorded is no error.
func checkShards(ctx context.Context, rdb redis.UniversalClient, n int) error {
	got, err := rdb.Get(ctx, fleetShardsKey).Result()
	switch {
	case errors.Is(err, redis.Nil):
		return nil
	case err != nil:
		return fmt.Errorf("read the fleet's shard count: %w: %v", errShardsUnreachable, err)
	}
	recorded, err := strconv.Atoi(got)
	if err != nil || recorded < 1 {
		return fmt.Errorf("the fleet's Redis holds %q under %s, which is no shard count: set it to the fleet's count (%s)", got, fleetShardsKey, envShards)
	}
	if recorded != n {
		return &shardMismatchError{have: n, recorded: recorded}
	}
	return nil
}

// errNoFleet means Redis answered but holds no vaultfleet fleet.
var errNoFleet = errors.New("holds no vaultfleet fleet")

// checkFleet returns an error naming redisURL (password redacted) when
// Redis does not answer or holds no vaultfleet fleet.
func checkFleet(ctx context.Context, rdb redis.UniversalClient, redisURL string) error {
	n, err := rdb.Exists(ctx, fleetKey).Result()
	if err != nil {
		return fmt.Errorf("the Redis at %s: %v", redact.URL(redisURL), err)
	}
	if n == 0 {
		return fmt.Errorf("the Redis at %s %w (no %s key: no vaultfleet worker, scheduler, serve or dev has run against it); set %s or --redis to the fleet's Redis",
			redact.URL(redisURL), errNoFleet, fleetKey, envRedisURL)
	}
	return nil
}
