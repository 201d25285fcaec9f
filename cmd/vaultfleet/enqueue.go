package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/tasks"
)

const enqueueSynopsis = `Enqueues one validation or token refresh of a connection (reason
on_demand, on the critical queue unless --queue says otherwise) and prints
the task id and queue. It needs only Redis: the worker reads the connection
when the task runs. The connection id must name an integration of the
catalog, and the Redis must be a vaultfleet fleet's (one that a worker,
scheduler, serve or dev has run against): enqueue refuses another Redis
rather than leave a task nobody will run.

subcommands:
  validate   check the connection's credentials now
  refresh    refresh the connection's OAuth token now`

// enqueueTimeout bounds the enqueue when Redis does not answer.
const enqueueTimeout = 10 * time.Second

// enqueueQueues are the queues --queue accepts.
var enqueueQueues = []string{tasks.QueueCritical, tasks.QueueDefault, tasks.QueueLow}

func runEnqueue(ctx context.Context, args []string, env Env) error {
	sub := ""
	if len(args) > 0 {
		sub = args[0]
	}
	cfg := newConfig(cmdEnqueue, "enqueue validate|refresh", enqueueSynopsis, env) // for the usage of enqueue itself
	switch sub {
	case "validate", "refresh":
		cfg = newConfig(cmdEnqueue, "enqueue "+sub, enqueueSynopsis, env)
	case "-h", "-help", "--help", "help":
		cfg.fs.Usage()
		return flag.ErrHelp
	case "":
		return errors.New("missing subcommand: want validate or refresh (see vaultfleet enqueue --help)")
	default:
		if strings.HasPrefix(sub, "-") {
			return fmt.Errorf("the subcommand comes first: vaultfleet enqueue validate|refresh --consumer C --connection ID, not %q", sub)
		}
		return fmt.Errorf("unknown subcommand %q: want validate or refresh", sub)
	}
	if err := cfg.parse(args[1:]); err != nil {
		return err
	}
	o := enqueueOpts{redisURL: cfg.str("redis"), catalog: cfg.str("catalog"), consumer: cfg.str("consumer"),
		connection: cfg.str("connection"), queue: cfg.str("queue")}
	if o.consumer == "" || o.connection == "" {
		return errors.New("--consumer and --connection are required")
	}
	newTask := tasks.NewValidateTask
	if sub == "refresh" {
		newTask = tasks.NewRefreshTask
	}
	task, err := newTask(o.consumer, o.connection, tasks.ReasonOnDemand, "")
	if err != nil {
		return err
	}
	if err := checkIntegration(o.catalog, o.connection); err != nil {
		return err
	}
	var opts []asynq.Option
	if o.queue != "" {
		opts = append(opts, asynq.Queue(o.queue))
	}
	rdb, err := openRedis(o.redisURL)
	if err != nil {
		return err
	}
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, enqueueTimeout)
	defer cancel()
	if err := checkFleet(ctx, rdb, o.redisURL); err != nil {
		return err
	}
	info, err := asynq.NewClientFromRedisClient(rdb).EnqueueContext(ctx, task, opts...)
	if err != nil {
		return fmt.Errorf("enqueue %s: %v", task.Type(), err)
	}
	fmt.Fprintf(env.Stdout, "enqueued %s task %s on queue %s\n", info.Type, info.ID, info.Queue)
	return nil
}

type enqueueOpts struct {
	redisURL, catalog, consumer, connection, queue string
}

// checkIntegration refuses a connection id whose integration the catalog
// (path, or the built-in one) does not have: the worker would skip it.
func checkIntegration(path, connectionID string) error {
	var cat *catalog.Catalog
	var err error
	if path != "" {
		cat, err = catalog.Load(path)
	} else {
		cat, err = catalog.Default()
	}
	if err != nil {
		return err
	}
	api, svc, _ := strings.Cut(connectionID, "+")
	if _, err := cat.Lookup(api, svc); err != nil {
		var known []string
		for _, id := range cat.IDs() {
			if in, ok := cat.Get(id); ok {
				known = append(known, in.UnifiedAPI+"+"+in.ID)
			}
		}
		return fmt.Errorf("--connection %q: no such integration in the catalog (known: %s)", connectionID, strings.Join(known, ", "))
	}
	return nil
}
