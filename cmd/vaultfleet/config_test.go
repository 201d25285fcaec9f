package main

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

var allCmds = []string{cmdDev, cmdWorker, cmdScheduler, cmdServe, cmdEnqueue, cmdReseal}

// TestConfigTable checks the table itself: every command of it exists,
// keys are unique per command, every default parses within its bounds,
// and the names follow the house form.
func TestConfigTable(t *testing.T) {
	t.Parallel()
	names := map[string]bool{}
	for _, c := range commands {
		names[c.name] = true
	}
	envRe := regexp.MustCompile(`^(REDIS_URL|VAULTFLEET_[A-Z_]+)$`)
	flagRe := regexp.MustCompile(`^[a-z][a-z-]*$`)
	for _, cmd := range allCmds {
		require.True(t, names[cmd], cmd)
		seen := map[string]bool{}
		for _, s := range settings {
			if !s.usedBy(cmd) {
				continue
			}
			name := s.source(false)
			require.False(t, seen[s.key()], "%s: two settings with key %s", cmd, s.key())
			seen[s.key()] = true
			require.NotEmpty(t, s.helpFor(cmd), name)
			require.False(t, strings.ContainsAny(s.helpFor(cmd), "`|"), "%s: help is shown as is in --help and in a README table", name)
			if s.docOnly {
				require.Empty(t, s.flag, name)
				continue
			}
			require.True(t, s.env != "" || s.flag != "", "a setting has a variable or a flag")
			if s.env != "" {
				require.Regexp(t, envRe, s.env)
			}
			if s.flag != "" {
				require.Regexp(t, flagRe, s.flag)
			}
			if s.kind == kindChoice {
				require.NotEmpty(t, s.choices, name)
			}
			if d := s.defaultFor(cmd); d != "" {
				_, err := s.parse(d)
				require.NoError(t, err, "%s: default %q of %s", cmd, d, name)
			}
			for _, b := range []string{s.min, s.max} {
				if b != "" {
					require.Contains(t, []kind{kindInt, kindFloat, kindDuration}, s.kind, "%s: bounds on a %s", name, s.kind.name())
					_, err := s.parse(b)
					require.NoError(t, err, "%s: bound %q", name, b)
				}
			}
		}
	}
	for _, s := range settings {
		for cmd := range s.defs {
			require.True(t, s.usedBy(cmd), "%s: default for %s, which does not read it", s.key(), cmd)
		}
		for cmd := range s.helps {
			require.True(t, s.usedBy(cmd), "%s: help for %s, which does not read it", s.key(), cmd)
		}
	}
}

// parseWith reads command cmd's configuration from vars and args.
func parseWith(cmd string, vars map[string]string, args ...string) (*config, error) {
	env, _, _ := testEnv(vars)
	cfg := newConfig(cmd, cmd, "", env)
	return cfg, cfg.parse(args)
}

// TestConfigKinds reads a variable of every kind, well formed and
// malformed, from the environment and from its flag: a good value reads
// back as its Go value, a malformed one is an error naming the variable
// (and its flag) or the flag it came from.
func TestConfigKinds(t *testing.T) {
	t.Parallel()
	type tc struct {
		cmd, env, flag, value string
		want                  any    // when good
		wantErr               string // the problem, when malformed
	}
	cases := []tc{
		// kindInt
		{cmdWorker, envShards, "shards", "32", 32, ""},
		{cmdWorker, envShards, "shards", " 32 ", 32, ""},
		{cmdWorker, envShards, "shards", "32abc", nil, `"32abc" is not a whole number`},
		{cmdWorker, envShards, "shards", "abc", nil, `"abc" is not a whole number`},
		{cmdWorker, envShards, "shards", "3.5", nil, `"3.5" is not a whole number`},
		{cmdWorker, envShards, "shards", "0", nil, "must be between 1 and 1024, got 0"},
		{cmdWorker, envShards, "shards", "2000", nil, "must be between 1 and 1024, got 2000"},
		{cmdWorker, envWorkerConcurrency, "concurrency", "abc", nil, `"abc" is not a whole number`},
		{cmdWorker, envWorkerConcurrency, "concurrency", "0", nil, "must be at least 1, got 0"},
		{cmdScheduler, envSchedMaxLowPending, "max-low-pending", "0", 0, ""},
		{cmdScheduler, envSchedMaxLowPending, "max-low-pending", "-1", nil, "must not be negative, got -1"},
		{cmdWorker, envAckReps, "", "2", 2, ""},
		{cmdWorker, envAckReps, "", "1x", nil, `"1x" is not a whole number`},
		{cmdWorker, envAckReps, "", "17", nil, "must be between 0 and 16, got 17"},
		// kindFloat
		{cmdScheduler, envSchedJitter, "jitter", "0.25", 0.25, ""},
		{cmdScheduler, envSchedJitter, "jitter", "0", 0.0, ""},
		{cmdScheduler, envSchedJitter, "jitter", "lots", nil, `"lots" is not a number`},
		{cmdScheduler, envSchedJitter, "jitter", "NaN", nil, `"NaN" is not a number`},
		{cmdScheduler, envSchedJitter, "jitter", "0.9", nil, "must be between 0 and 0.5, got 0.9"},
		// kindDuration
		{cmdScheduler, envSchedLease, "lease", "90s", 90 * time.Second, ""},
		{cmdScheduler, envSchedLease, "lease", "2m", 2 * time.Minute, ""},
		{cmdScheduler, envSchedLease, "lease", "90", nil, `"90" is not a duration like 25s`},
		{cmdScheduler, envSchedLease, "lease", "10ms", nil, "must be at least 1s, got 10ms"},
		{cmdScheduler, envSchedTick, "tick", "0s", nil, "must be positive, got 0s"},
		{cmdWorker, envWorkerShutdownTimeout, "shutdown-timeout", "25", nil, `"25" is not a duration`},
		{cmdWorker, envWorkerPersistTimeout, "persist-timeout", "-1s", nil, "must be positive, got -1s"},
		// kindBool: below, every form of strconv.ParseBool
		{cmdServe, envMonitorReadOnly, "monitor-readonly", "yes", nil, `"yes" is not a boolean`},
		{cmdServe, envMonitorReadOnly, "monitor-readonly", "2", nil, `"2" is not a boolean`},
		// kindURL
		{cmdServe, envPrometheusURL, "prometheus-url", "http://prometheus:9090", "http://prometheus:9090", ""},
		{cmdServe, envPrometheusURL, "prometheus-url", "prometheus:9090", nil, "not an absolute http or https URL"},
		{cmdServe, envPrometheusURL, "prometheus-url", "ftp://prometheus", nil, "not an absolute http or https URL"},
		{cmdServe, envPublicURL, "", "https://fleet.example.com", "https://fleet.example.com", ""},
		{cmdServe, envPublicURL, "", "fleet.example.com", nil, "not an absolute http or https URL"},
		// kindAddr
		{cmdWorker, envAddr, "addr", "127.0.0.1:9", "127.0.0.1:9", ""},
		{cmdWorker, envAddr, "addr", ":9101", ":9101", ""},
		{cmdWorker, envAddr, "addr", "9101", nil, `"9101" is not a listen address host:port`},
		{cmdWorker, envAddr, "addr", "localhost:", nil, `"localhost:" is not a listen address`},
		// kindChoice
		{cmdWorker, envLogFormat, "log-format", "text", "text", ""},
		{cmdWorker, envLogFormat, "log-format", "JSON", "json", ""},
		{cmdWorker, envLogFormat, "log-format", "xml", nil, `"xml" is not one of json, text`},
		{cmdWorker, envLogLevel, "log-level", "loud", nil, `"loud" is not one of debug, info, warn, error`},
		// kindString, kindSecret, kindRedisURL: read as given (their users
		// check them and name the variable)
		{cmdWorker, envCatalog, "catalog", "/etc/catalog.yaml", "/etc/catalog.yaml", ""},
		{cmdWorker, secrets.EnvKeys, "", " k1:abc ", " k1:abc ", ""},
		{cmdWorker, envRedisURL, "redis", "redis://:pw@redis:6379/0", "redis://:pw@redis:6379/0", ""},
	}
	for _, form := range []string{"1", "t", "T", "TRUE", "true", "True"} {
		cases = append(cases, tc{cmdServe, envMonitorReadOnly, "monitor-readonly", form, true, ""})
	}
	for _, form := range []string{"0", "f", "F", "FALSE", "false", "False"} {
		cases = append(cases, tc{cmdServe, envMonitorReadOnly, "monitor-readonly", form, false, ""})
	}
	for _, c := range cases {
		key := c.flag
		if key == "" {
			key = c.env
		}
		t.Run(c.env+"="+c.value, func(t *testing.T) {
			t.Parallel()
			cfg, err := parseWith(c.cmd, map[string]string{c.env: c.value})
			if c.wantErr == "" {
				require.NoError(t, err)
				got, ok := cfg.value(key)
				require.True(t, ok)
				require.Equal(t, c.want, got)
			} else {
				require.Error(t, err)
				source := c.env
				if c.flag != "" {
					source += " (--" + c.flag + ")"
				}
				require.Contains(t, err.Error(), source, "names the variable and its flag")
				require.Contains(t, err.Error(), c.wantErr)
				require.NotContains(t, err.Error(), "\n")
			}
			if c.flag == "" {
				return
			}
			// The same value given by the flag: the error names the flag.
			cfg, err = parseWith(c.cmd, nil, "--"+c.flag+"="+c.value)
			if c.wantErr == "" {
				require.NoError(t, err)
				got, _ := cfg.value(key)
				require.Equal(t, c.want, got)
				return
			}
			require.ErrorContains(t, err, "--"+c.flag)
			require.NotContains(t, err.Error(), c.env)
			require.Contains(t, err.Error(), c.wantErr)
		})
	}
}

func TestConfigPrecedenceAndDefaults(t *testing.T) {
	t.Parallel()
	// Default, then the variable, then the flag.
	cfg, err := parseWith(cmdWorker, nil)
	require.NoError(t, err)
	require.Equal(t, state.DefaultShards, cfg.int("shards"))
	require.Equal(t, defaultWorkerAddr, cfg.str("addr"))
	require.Equal(t, 25*time.Second, cfg.duration("shutdown-timeout"))
	_, set := cfg.intOK(envAckReps)
	require.False(t, set, "no default: the URL decides")
	cfg, err = parseWith(cmdWorker, map[string]string{envShards: "32"})
	require.NoError(t, err)
	require.Equal(t, 32, cfg.int("shards"))
	cfg, err = parseWith(cmdWorker, map[string]string{envShards: "32"}, "--shards", "64")
	require.NoError(t, err)
	require.Equal(t, 64, cfg.int("shards"))
	// A flag wins over a malformed variable, which is then not read.
	cfg, err = parseWith(cmdWorker, map[string]string{envShards: "32abc"}, "--shards", "8")
	require.NoError(t, err)
	require.Equal(t, 8, cfg.int("shards"))
	// Per-command defaults.
	for cmd, want := range map[string]string{cmdDev: defaultDevAddr, cmdScheduler: ":9102", cmdServe: defaultServeAddr} {
		cfg, err := parseWith(cmd, nil)
		require.NoError(t, err)
		require.Equal(t, want, cfg.str("addr"), cmd)
	}
	cfg, err = parseWith(cmdDev, nil)
	require.NoError(t, err)
	require.Empty(t, cfg.str("redis"), "dev: embedded Redis")
	require.Equal(t, "text", cfg.str("log-format"))
	cfg, err = parseWith(cmdReseal, nil)
	require.NoError(t, err)
	require.Equal(t, "warn", cfg.str("log-level"))
	// An empty flag is "unset" only where there is no default.
	_, err = parseWith(cmdWorker, nil, "--shards=")
	require.EqualError(t, err, `--shards: "" is not a whole number`)
	cfg, err = parseWith(cmdServe, nil, "--prometheus-url=")
	require.NoError(t, err)
	require.Empty(t, cfg.str("prometheus-url"))
	// A bare boolean flag.
	cfg, err = parseWith(cmdServe, map[string]string{envMonitorReadOnly: "false"}, "--monitor-readonly")
	require.NoError(t, err)
	require.True(t, cfg.bool("monitor-readonly"))
	// Every malformed value is reported, in one line.
	_, err = parseWith(cmdScheduler, map[string]string{envSchedTick: "soon", envShards: "32abc"}, "--batch", "0")
	require.EqualError(t, err, `VAULTFLEET_SHARDS (--shards): "32abc" is not a whole number; `+
		`VAULTFLEET_TICK (--tick): "soon" is not a duration like 25s or 2m; --batch must be between 1 and 100000, got 0`)
	require.Panics(t, func() { cfg.int("no-such-setting") }, "a key the command does not read is a programmer error")
}

// TestConfigHidesSecrets: values that may hold a password are never
// echoed, whether they came from a variable or a flag.
func TestConfigHidesSecrets(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"http//user:s3cret@prometheus:9090", "prometheus:s3cret@host"} {
		_, err := parseWith(cmdServe, map[string]string{envPrometheusURL: bad, envPublicURL: bad})
		require.Error(t, err)
		require.NotContains(t, err.Error(), "s3cret")
		require.Contains(t, err.Error(), envPrometheusURL)
		require.Contains(t, err.Error(), envPublicURL)
		_, err = parseWith(cmdServe, nil, "--prometheus-url", bad)
		require.Error(t, err)
		require.NotContains(t, err.Error(), "s3cret")
	}
	// Through the binary: exit 1, one line, no secret.
	env, _, errOut := testEnv(map[string]string{envPrometheusURL: "http//u:s3cret@p", envAPITokens: "s3cret-token-0123456789"})
	require.Equal(t, 1, run(context.Background(), []string{"serve"}, env))
	require.Equal(t, "vaultfleet serve: "+envPrometheusURL+" (--prometheus-url): not an absolute http or https URL (value not shown: it may hold a password)\n", errOut.String())
}

// TestConfigMalformedThroughCommands: each command refuses a malformed
// variable of its own with exit status 1 and one line naming it, before it
// touches Redis.
func TestConfigMalformedThroughCommands(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cmd  []string
		vars map[string]string
		want string
	}{
		{[]string{"worker"}, map[string]string{envShards: "32abc"}, envShards + ` (--shards): "32abc" is not a whole number`},
		{[]string{"scheduler"}, map[string]string{envShards: "abc"}, envShards + ` (--shards): "abc" is not a whole number`},
		{[]string{"serve"}, map[string]string{envMonitorReadOnly: "yes"}, envMonitorReadOnly + ` (--monitor-readonly): "yes" is not a boolean`},
		{[]string{"reseal"}, map[string]string{envLogLevel: "chatty"}, envLogLevel + ` (--log-level): "chatty" is not one of`},
		{[]string{"dev"}, map[string]string{envWorkerConcurrency: "many"}, envWorkerConcurrency + ` (--concurrency): "many" is not a whole number`},
		{[]string{"dev", "--consumers", "1"}, nil, "--consumers must be at least 2, got 1"},
		{[]string{"enqueue", "validate", "--consumer", "c", "--connection", "crm+hubspot", "--queue", "soon"}, nil, `--queue: "soon" is not one of critical, default, low`},
	} {
		t.Run(strings.Join(tc.cmd, " "), func(t *testing.T) {
			t.Parallel()
			env, _, errOut := testEnv(tc.vars)
			require.Equal(t, 1, run(context.Background(), tc.cmd, env), errOut.String())
			require.Contains(t, errOut.String(), tc.want)
			require.Equal(t, 1, strings.Count(errOut.String(), "\n"), errOut.String())
		})
	}
}

// TestKnownEnv: the table and the built-in catalog's client credentials
// are known; nothing else is.
func TestKnownEnv(t *testing.T) {
	t.Parallel()
	for _, s := range settings {
		if s.env != "" && !s.docOnly {
			require.True(t, knownEnv(s.env), s.env)
		}
	}
	require.True(t, knownEnv("SALESFORCE_CLIENT_SECRET"))
	require.False(t, knownEnv("VAULTFLEET_SHRADS"))
	require.False(t, knownEnv("(the catalog's client_id_env, client_secret_env)"))
}

// TestShardCountRecorded: the first process records the fleet's shard
// count in Redis; a process started with another count refuses to start,
// naming both counts and the fix, and writes nothing; one with the same
// count starts.
func TestShardCountRecorded(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	vars := map[string]string{envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys, envShards: "32"}

	// A scheduler with 32 shards runs.
	env, _, errOut := testEnv(vars)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"scheduler", "--addr", "127.0.0.1:0", "--tick", "50ms"}, env) }()
	require.Eventually(t, func() bool {
		return rdb.HExists(context.Background(), fleetKey, "scheduler").Val()
	}, 10*time.Second, 20*time.Millisecond, errOut.String())
	require.Equal(t, "32", rdb.Get(context.Background(), fleetShardsKey).Val())

	// A worker with the default count (16) refuses.
	wenv, _, werr := testEnv(map[string]string{envRedisURL: vars[envRedisURL], secrets.EnvKeys: testKeys})
	require.Equal(t, 1, run(context.Background(), []string{"worker", "--addr", "127.0.0.1:0"}, wenv), werr.String())
	msg := werr.String()
	require.Equal(t, 1, strings.Count(msg, "\n"), msg)
	require.Contains(t, msg, "this process has 16 index shards but the fleet's Redis records 32")
	require.Contains(t, msg, envShards+"=32 (or --shards 32)")
	require.False(t, rdb.HExists(context.Background(), fleetKey, "worker").Val(), "a refused process leaves no mark")
	require.Equal(t, "32", rdb.Get(context.Background(), fleetShardsKey).Val(), "nor changes the record")

	// So does serve with --shards 8 (the flag wins over the variable), and
	// reseal, which would walk the wrong indexes.
	senv, _, serr := testEnv(map[string]string{envRedisURL: vars[envRedisURL], secrets.EnvKeys: testKeys,
		envAPITokens: "token-0123456789abcdef", envShards: "32"})
	require.Equal(t, 1, run(context.Background(), []string{"serve", "--addr", "127.0.0.1:0", "--shards", "8"}, senv), serr.String())
	require.Contains(t, serr.String(), "this process has 8 index shards but the fleet's Redis records 32")
	renv, rout, rerr := testEnv(map[string]string{envRedisURL: vars[envRedisURL], secrets.EnvKeys: testKeys})
	require.Equal(t, 1, run(context.Background(), []string{"reseal"}, renv), rerr.String())
	require.Contains(t, rerr.String(), "this process has 16 index shards but the fleet's Redis records 32")
	require.NotContains(t, rout.String(), "done", "reseal walked nothing")

	// A worker with the fleet's count starts.
	wenv, _, werr = testEnv(vars)
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	wcode := make(chan int, 1)
	go func() { wcode <- run(wctx, []string{"worker", "--addr", "127.0.0.1:0"}, wenv) }()
	require.Eventually(t, func() bool {
		return rdb.HExists(context.Background(), fleetKey, "worker").Val()
	}, 10*time.Second, 20*time.Millisecond, werr.String())

	wcancel()
	cancel()
	for _, ch := range []chan int{code, wcode} {
		select {
		case c := <-ch:
			require.Equal(t, 0, c, errOut.String(), werr.String())
		case <-time.After(15 * time.Second):
			t.Fatal("a process did not stop")
		}
	}
}

// TestShardCountFirstStartRace: processes with different counts starting
// at once on an empty Redis: exactly one count is recorded, and every
// process with another one refuses.
func TestShardCountFirstStartRace(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	counts := []int{8, 16, 32, 8, 16, 32, 8, 16}
	errs := make([]error, len(counts))
	var wg sync.WaitGroup
	for i, n := range counts {
		wg.Go(func() {
			errs[i] = announceFleet(context.Background(), rdb, fmt.Sprintf("p%d", i), n, slog.New(slog.DiscardHandler))
		})
	}
	wg.Wait()
	recorded, err := strconv.Atoi(rdb.Get(context.Background(), fleetShardsKey).Val())
	require.NoError(t, err)
	for i, n := range counts {
		if n == recorded {
			require.NoError(t, errs[i])
			continue
		}
		var mismatch *shardMismatchError
		require.ErrorAs(t, errs[i], &mismatch)
		require.Equal(t, shardMismatchError{have: n, recorded: recorded}, *mismatch)
	}
}

// TestShardCountUnreachableOrCorrupt: a Redis that does not answer does not
// stop a process (it waits for Redis as before); a record that is no count
// is refused with its key named.
func TestShardCountUnreachableOrCorrupt(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	down := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	t.Cleanup(func() { _ = down.Close() })
	require.NoError(t, announceFleet(context.Background(), down, "worker", 16, slog.New(slog.NewTextHandler(&logs, nil))))
	require.Contains(t, logs.String(), "cannot check the fleet's shard count")

	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	require.NoError(t, checkShards(context.Background(), rdb, 16), "nothing recorded: reseal and others may run")
	require.NoError(t, rdb.Set(context.Background(), fleetShardsKey, "sixteen", 0).Err())
	err := announceFleet(context.Background(), rdb, "worker", 16, slog.New(slog.DiscardHandler))
	require.ErrorContains(t, err, `holds "sixteen" under `+fleetShardsKey)
}
