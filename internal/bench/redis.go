package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/freeport"
)

// ComposeRedisArgs are the redis-server settings of docker-compose.yml's
// redis service, which the private server runs with (persistence to a
// temporary directory: the AOF's fsync cost is part of the figures).
var ComposeRedisArgs = []string{"--appendonly", "yes", "--appendfsync", "everysec",
	"--maxmemory-policy", "noeviction", "--hash-max-listpack-value", "1024"}

// privateRedis is a redis-server the bench started and owns.
type privateRedis struct {
	addr string
	dir  string
	cmd  *exec.Cmd
}

// startRedis starts redis-server on a free loopback port with the compose
// settings, in a temporary directory.
func startRedis() (*privateRedis, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errors.New("no redis-server on PATH: install it, or set REDIS_URL to an empty Redis database")
	}
	dir, err := os.MkdirTemp("", "vaultfleet-bench-*")
	if err != nil {
		return nil, err
	}
	var lastErr error
	for range 5 {
		port, err := freeport.Loopback()
		if err != nil {
			_ = os.RemoveAll(dir)
			return nil, err
		}
		args := append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "",
			"--dir", dir, "--protected-mode", "no", "--loglevel", "warning"}, ComposeRedisArgs...)
		cmd := exec.Command(bin, args...)
		dieWithParent(cmd)
		logf, err := os.Create(filepath.Join(dir, "redis.log"))
		if err != nil {
			_ = os.RemoveAll(dir)
			return nil, err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			_ = logf.Close()
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("start redis-server: %w", err)
		}
		_ = logf.Close()
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if lastErr = waitPing(addr, 10*time.Second); lastErr == nil {
			return &privateRedis{addr: addr, dir: dir, cmd: cmd}, nil
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
	_ = os.RemoveAll(dir)
	return nil, fmt.Errorf("redis-server did not start: %w", lastErr)
}

// Close stops the server and removes its directory.
func (p *privateRedis) Close() {
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
	_ = os.RemoveAll(p.dir)
}

func waitPing(addr string, d time.Duration) error {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(d)
	var err error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		err = c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("redis-server on %s did not answer PING: %w", addr, err)
}

// roundTrips counts the requests the bench's Redis client sends: one per
// command, one per pipeline (a pipeline is one round trip).
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmd)
	}
}

func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmds)
	}
}

// info reads one INFO section as key -> value.
func info(ctx context.Context, rdb redis.UniversalClient, section string) (map[string]string, error) {
	s, err := rdb.Info(ctx, section).Result()
	if err != nil {
		return nil, fmt.Errorf("INFO %s: %w", section, err)
	}
	m := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = v
		}
	}
	return m, nil
}

// redisStats is a snapshot of the server's CPU, command counts and memory.
type redisStats struct {
	cpu      time.Duration
	commands int64 // every command executed, those run by Lua scripts included
	byName   map[string]int64
	memory   int64 // used_memory less client, AOF and replication buffers
}

func snapshot(ctx context.Context, rdb redis.UniversalClient) (redisStats, error) {
	st := redisStats{byName: map[string]int64{}}
	cpu, err := info(ctx, rdb, "cpu")
	if err != nil {
		return st, err
	}
	for _, k := range []string{"used_cpu_sys", "used_cpu_user"} {
		f, _ := strconv.ParseFloat(cpu[k], 64)
		st.cpu += time.Duration(f * float64(time.Second))
	}
	cs, err := info(ctx, rdb, "commandstats")
	if err != nil {
		return st, err
	}
	for k, v := range cs {
		if !strings.HasPrefix(k, "cmdstat_") {
			continue
		}
		for f := range strings.SplitSeq(v, ",") {
			if n, ok := strings.CutPrefix(f, "calls="); ok {
				c, _ := strconv.ParseInt(n, 10, 64)
				st.commands += c
				st.byName[strings.TrimPrefix(k, "cmdstat_")] += c
			}
		}
	}
	mem, err := info(ctx, rdb, "memory")
	if err != nil {
		return st, err
	}
	st.memory, _ = strconv.ParseInt(mem["used_memory"], 10, 64)
	// Less what belongs to no key: client buffers (the bench holds
	// hundreds of pooled connections whose buffers Redis shrinks while
	// they idle), the AOF buffer and the replication backlog.
	for _, k := range []string{"mem_clients_normal", "mem_clients_slaves", "mem_aof_buffer", "mem_replication_backlog"} {
		v, _ := strconv.ParseInt(mem[k], 10, 64)
		st.memory -= v
	}
	return st, nil
}

// serverSettings reads the server's version and the settings that decide
// memory per connection.
func serverSettings(ctx context.Context, rdb redis.UniversalClient) (string, error) {
	srv, err := info(ctx, rdb, "server")
	if err != nil {
		return "", err
	}
	parts := []string{"redis " + srv["redis_version"]}
	for _, k := range []string{"appendonly", "appendfsync", "maxmemory-policy", "hash-max-listpack-value",
		"hash-max-listpack-entries", "zset-max-listpack-entries", "zset-max-listpack-value"} {
		v, err := rdb.ConfigGet(ctx, k).Result()
		if err != nil {
			// A managed Redis may refuse CONFIG: say so rather than fail.
			parts = append(parts, k+" unknown (CONFIG GET refused)")
			continue
		}
		parts = append(parts, k+" "+v[k])
	}
	return strings.Join(parts, ", "), nil
}

// commandDeltas returns the commands run between two snapshots, by name.
func commandDeltas(a, b redisStats) map[string]int64 {
	d := map[string]int64{}
	for k, v := range b.byName {
		if n := v - a.byName[k]; n > 0 {
			d[k] = n
		}
	}
	return d
}
