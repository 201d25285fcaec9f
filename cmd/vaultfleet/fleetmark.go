package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
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

// announceTimeout bounds the start-up writes of announceFleet.
const announceTimeout = 5 * time.Second

// announceFleet marks rdb as the fleet's and registers the fleet's queues
// with asynq, so the monitor lists all of them from the start. A failure is
// logged, not fatal: the process still starts and waits for Redis as it
// would without it.
func announceFleet(ctx context.Context, rdb redis.UniversalClient, process string, logger *slog.Logger) {
	ctx, cancel := context.WithTimeout(ctx, announceTimeout)
	defer cancel()
	queues := make([]string, 0, len(tasks.Queues()))
	for q := range tasks.Queues() {
		queues = append(queues, q)
	}
	slices.Sort(queues)
	err := monitor.RegisterQueues(ctx, rdb, queues...)
	if err == nil {
		err = rdb.HSet(ctx, fleetKey, process, time.Now().UTC().Format(time.RFC3339)).Err()
	}
	if err != nil {
		logger.Warn("cannot register the fleet's queues in Redis", slog.String("error", err.Error()))
	}
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
