package main

import (
	"context"
	"log/slog"
	"regexp"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// TestEnqueueCommand enqueues through `vaultfleet enqueue` against a
// private Redis and finds the tasks where it said they went.
func TestEnqueueCommand(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	insp := asynq.NewInspectorFromRedisClient(rdb)
	// A fleet has run against this Redis.
	require.NoError(t, announceFleet(context.Background(), rdb, "worker", state.DefaultShards, slog.New(slog.DiscardHandler)))
	vars := map[string]string{envRedisURL: "redis://" + srv.Addr + "/0"}
	line := regexp.MustCompile(`^enqueued (\S+) task (\S+) on queue (\S+)\n$`)

	tests := map[string]struct {
		args      []string
		wantType  string
		wantQueue string
	}{
		"Validate":     {args: []string{"validate", "--consumer", "c1", "--connection", "crm+pipedrive"}, wantType: tasks.TypeValidate, wantQueue: tasks.QueueCritical},
		"Refresh":      {args: []string{"refresh", "--consumer", "c1", "--connection", "crm+hubspot"}, wantType: tasks.TypeRefreshToken, wantQueue: tasks.QueueCritical},
		"ValidateLow":  {args: []string{"validate", "--consumer", "c2", "--connection", "hris+bamboohr", "--queue", "low"}, wantType: tasks.TypeValidate, wantQueue: tasks.QueueLow},
		"ValidateSame": {args: []string{"validate", "--consumer", "c1", "--connection", "crm+pipedrive"}, wantType: tasks.TypeValidate, wantQueue: tasks.QueueCritical},
	}
	ids := map[string]bool{}
	for name, tc := range tests {
		env, out, errOut := testEnv(vars)
		require.Equal(t, 0, run(context.Background(), append([]string{"enqueue"}, tc.args...), env), name+": "+errOut.String())
		m := line.FindStringSubmatch(out.String())
		require.NotNil(t, m, "%s: %q", name, out.String())
		require.Equal(t, tc.wantType, m[1], name)
		require.Equal(t, tc.wantQueue, m[3], name)
		require.False(t, ids[m[2]], "on-demand tasks are never deduped")
		ids[m[2]] = true
		ti, err := insp.GetTaskInfo(m[3], m[2])
		require.NoError(t, err, name)
		p, err := tasks.ParseConnectionPayload(ti.Payload)
		require.NoError(t, err)
		require.Equal(t, tasks.ReasonOnDemand, p.Reason)
		require.Empty(t, p.Key)
	}
}

func TestEnqueueErrors(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		args     []string
		wantCode int
		wantErr  string
	}{
		"NoSubcommand":       {wantCode: 1, wantErr: "missing subcommand: want validate or refresh"},
		"FlagsFirst":         {args: []string{"--consumer", "c1", "validate"}, wantCode: 1, wantErr: "the subcommand comes first"},
		"UnknownSubcmd":      {args: []string{"purge"}, wantCode: 1, wantErr: `unknown subcommand "purge": want validate or refresh`},
		"BadConnection":      {args: []string{"validate", "--consumer", "c1", "--connection", "Salesforce"}, wantCode: 1, wantErr: "connection_id must look like unified_api+service_id"},
		"BadConsumer":        {args: []string{"refresh", "--consumer", "a|b", "--connection", "crm+hubspot"}, wantCode: 1, wantErr: "consumer_id missing or not a valid id"},
		"MissingConsumer":    {args: []string{"validate", "--connection", "crm+hubspot"}, wantCode: 1, wantErr: "--consumer and --connection are required"},
		"BadQueue":           {args: []string{"validate", "--consumer", "c1", "--connection", "crm+hubspot", "--queue", "events"}, wantCode: 1, wantErr: `--queue: "events" is not one of critical, default, low`},
		"UnknownFlag":        {args: []string{"validate", "--nope"}, wantCode: 2, wantErr: "flag provided but not defined: -nope"},
		"ExtraArgument":      {args: []string{"validate", "--consumer", "c1", "--connection", "crm+hubspot", "now"}, wantCode: 2, wantErr: `unexpected argument "now"`},
		"RedisUnreachable":   {args: []string{"validate", "--consumer", "c1", "--connection", "crm+hubspot", "--redis", "redis://:s3cret-pw@127.0.0.1:1/0"}, wantCode: 1, wantErr: "the Redis at redis://xxxxx@127.0.0.1:1/0: "},
		"UnknownIntegration": {args: []string{"validate", "--consumer", "c1", "--connection", "crm+nosuchcrm"}, wantCode: 1, wantErr: `--connection "crm+nosuchcrm": no such integration in the catalog (known: `},
		"WrongUnifiedAPI":    {args: []string{"refresh", "--consumer", "c1", "--connection", "hris+salesforce"}, wantCode: 1, wantErr: `--connection "hris+salesforce": no such integration`},
		"BadRedisURL":        {args: []string{"validate", "--consumer", "c1", "--connection", "crm+hubspot", "--redis", "http://x"}, wantCode: 1, wantErr: "not a valid Redis URL"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			env, out, errOut := testEnv(nil)
			require.Equal(t, tc.wantCode, run(context.Background(), append([]string{"enqueue"}, tc.args...), env), errOut.String())
			require.Empty(t, out.String())
			require.Contains(t, errOut.String(), tc.wantErr)
			require.NotContains(t, errOut.String(), "s3cret-pw")
			if tc.wantCode == 1 {
				require.Equal(t, 1, strings.Count(errOut.String(), "\n"), "one line: %q", errOut.String())
			}
		})
	}
}

// TestEnqueueRefusesForeignRedis: a Redis no vaultfleet process has run
// against (an unrelated one on the default address, say) is refused with
// the URL tried, and nothing is enqueued there.
func TestEnqueueRefusesForeignRedis(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	url := "redis://" + srv.Addr + "/0"
	env, out, errOut := testEnv(map[string]string{envRedisURL: url})
	args := []string{"enqueue", "validate", "--consumer", "c1", "--connection", "crm+pipedrive"}
	require.Equal(t, 1, run(context.Background(), args, env))
	require.Empty(t, out.String())
	require.Contains(t, errOut.String(), "the Redis at "+url+" holds no vaultfleet fleet")
	keys, err := rdb.Keys(context.Background(), "*").Result()
	require.NoError(t, err)
	require.Empty(t, keys, "nothing was written to a foreign Redis")

	// Once a fleet process has run against it, the same command works.
	require.NoError(t, announceFleet(context.Background(), rdb, "serve", state.DefaultShards, slog.New(slog.DiscardHandler)))
	env, out, errOut = testEnv(map[string]string{envRedisURL: url})
	require.Equal(t, 0, run(context.Background(), args, env), errOut.String())
	require.Contains(t, out.String(), "enqueued connection:validate task")
}

func TestEnqueueHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"validate", "--help"}, {"refresh", "-h"}} {
		env, _, errOut := testEnv(nil)
		require.Equal(t, 0, run(context.Background(), append([]string{"enqueue"}, args...), env))
		for _, want := range []string{"usage: vaultfleet enqueue", "-consumer", "-connection", "-queue", "-redis",
			"validate", "refresh", envRedisURL} {
			require.Contains(t, errOut.String(), want, "%v", args)
		}
		require.NotContains(t, errOut.String(), "-addr", "enqueue serves nothing")
	}
}
