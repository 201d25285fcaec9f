package monitor

import (
	"context"

	"github.com/redis/go-redis/v9"
)

// queuesKey is the set asynq keeps of every queue it has seen (asynq
// internal/base.AllQueues). asynq adds a queue to it on the first enqueue
// only, and the monitor lists and opens only the queues in it.
const queuesKey = "asynq:queues"

// RegisterQueues adds names to asynq's set of known queues, so that the
// monitor lists every queue of the fleet from the start (a queue nothing
// was enqueued to yet otherwise answers "queue not found"). Adding a queue
// that is already known changes nothing.
func RegisterQueues(ctx context.Context, rdb redis.UniversalClient, names ...string) error {
	if len(names) == 0 {
		return nil
	}
	members := make([]any, len(names))
	for i, n := range names {
		members[i] = n
	}
	return rdb.SAdd(ctx, queuesKey, members...).Err()
}
