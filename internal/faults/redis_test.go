package faults

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisServer is a real redis-server with AOF (appendfsync everysec) in a
// directory of its own, on a private loopback port.
type redisServer struct {
	t    *testing.T
	ps   *procs
	name string
	dir  string
	port int
	args []string
	p    *proc
}

func (r *redisServer) addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }

// startRedis starts a redis-server with AOF; extra are more arguments
// (e.g. --replicaof).
func startRedis(t *testing.T, ps *procs, name string, extra ...string) *redisServer {
	t.Helper()
	dir := filepath.Join(ps.dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	r := &redisServer{t: t, ps: ps, name: name, dir: dir}
	for attempt := 0; ; attempt++ {
		r.port = freePort(t)
		r.args = append([]string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
			"--dir", dir, "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
			"--protected-mode", "no", "--enable-debug-command", "yes", "--loglevel", "notice"}, extra...)
		r.p = ps.start(name, "redis-server", r.args, baseEnv(nil), false)
		if r.waitUp(10 * time.Second) {
			return r
		}
		r.p.kill9()
		if attempt == 3 {
			t.Fatalf("redis-server %s did not come up:\n%s", name, tailFile(r.p.logPath, 2000))
		}
	}
}

func (r *redisServer) waitUp(d time.Duration) bool {
	c := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	defer c.Close()
	_, ok := waitFor(d, 50*time.Millisecond, func() bool {
		if r.p.exited() {
			return false
		}
		err := c.Ping(context.Background()).Err()
		// A server still loading its AOF answers LOADING: not up yet.
		return err == nil
	})
	return ok
}

// stop shuts the server down cleanly (SIGTERM: the AOF is flushed).
func (r *redisServer) stop() {
	if _, ok := r.p.stop(20 * time.Second); !ok {
		r.t.Logf("%s needed SIGKILL", r.name)
	}
}

// restart starts the server again on the same port and directory: it
// loads its AOF.
func (r *redisServer) restart() {
	r.t.Helper()
	r.p = r.ps.start(r.name, "redis-server", r.args, baseEnv(nil), false)
	if !r.waitUp(30 * time.Second) {
		r.t.Fatalf("%s did not come back:\n%s", r.name, tailFile(r.p.logPath, 2000))
	}
}

// sleep blocks the server for d with DEBUG SLEEP (it answers nothing
// meanwhile; keys whose TTL ran out are gone when it wakes). It returns
// once the sleep has started.
func (r *redisServer) sleep(d time.Duration) <-chan error {
	done := make(chan error, 1)
	c := redis.NewClient(&redis.Options{Addr: r.addr(), ReadTimeout: -1, MaxRetries: -1})
	go func() {
		defer c.Close()
		done <- c.Do(context.Background(), "DEBUG", "SLEEP", fmt.Sprintf("%.3f", d.Seconds())).Err()
	}()
	// The sleep has begun when a PING no longer answers quickly.
	probe := redis.NewClient(&redis.Options{Addr: r.addr(), ReadTimeout: 200 * time.Millisecond, MaxRetries: -1})
	defer probe.Close()
	waitFor(5*time.Second, 20*time.Millisecond, func() bool {
		return probe.Ping(context.Background()).Err() != nil
	})
	return done
}

// sentinelSet is a master, a replica and three sentinels on loopback.
type sentinelSet struct {
	master, replica *redisServer
	sentinels       []*proc
	ports           []int
	name            string
}

const sentinelMaster = "faults"

func startSentinels(t *testing.T, ps *procs) *sentinelSet {
	t.Helper()
	s := &sentinelSet{name: sentinelMaster}
	s.master = startRedis(t, ps, "redis-master")
	s.replica = startRedis(t, ps, "redis-replica", "--replicaof", "127.0.0.1", strconv.Itoa(s.master.port))
	for i := range 3 {
		port := freePort(t)
		conf := filepath.Join(ps.dir, fmt.Sprintf("sentinel-%d.conf", i))
		body := fmt.Sprintf(`port %d
bind 127.0.0.1
protected-mode no
dir %s
sentinel monitor %s 127.0.0.1 %d 2
sentinel down-after-milliseconds %s %d
sentinel failover-timeout %s 10000
sentinel parallel-syncs %s 1
`, port, ps.dir, s.name, s.master.port, s.name, pick(3000, 10000), s.name, s.name)
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		p := ps.start("sentinel", "redis-server", []string{conf, "--sentinel"}, baseEnv(nil), false)
		s.sentinels = append(s.sentinels, p)
		s.ports = append(s.ports, port)
	}
	// Ready when every sentinel knows the master, the replica and the other
	// sentinels.
	ctx := context.Background()
	_, ok := waitFor(30*time.Second, 100*time.Millisecond, func() bool {
		for _, port := range s.ports {
			c := redis.NewSentinelClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(port)})
			m, err := c.Master(ctx, s.name).Result()
			_ = c.Close()
			if err != nil || m["num-other-sentinels"] != "2" || m["num-slaves"] != "1" {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("sentinels did not settle")
	}
	return s
}

// url is REDIS_URL for the fleet, in the form go-redis's ParseFailoverURL
// accepts (see the README note on the documented form).
func (s *sentinelSet) url() string {
	q := []string{"master_name=" + s.name}
	for _, p := range s.ports[1:] {
		q = append(q, "addr=127.0.0.1:"+strconv.Itoa(p))
	}
	return fmt.Sprintf("redis-sentinel://127.0.0.1:%d/0?%s", s.ports[0], strings.Join(q, "&"))
}

// documentedURL is the form README.md documents.
func (s *sentinelSet) documentedURL() string {
	return fmt.Sprintf("redis-sentinel://127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d/0?master=%s",
		s.ports[0], s.ports[1], s.ports[2], s.name)
}

// currentMaster asks a sentinel for the master's address.
func (s *sentinelSet) currentMaster() string {
	c := redis.NewSentinelClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(s.ports[0])})
	defer c.Close()
	a, err := c.GetMasterAddrByName(context.Background(), s.name).Result()
	if err != nil || len(a) != 2 {
		return ""
	}
	return a[0] + ":" + a[1]
}

// failover makes the master stop answering (SIGSTOP: a hung or
// partitioned master, which acknowledges nothing more) and waits until the
// sentinels have promoted the replica; then the old master resumes and is
// turned into a replica by the sentinels.
func (s *sentinelSet) failover(t *testing.T) time.Duration {
	t.Helper()
	before := s.currentMaster()
	s.master.p.signal(syscall.SIGSTOP)
	d, ok := waitFor(60*time.Second, 50*time.Millisecond, func() bool {
		m := s.currentMaster()
		return m != "" && m != before
	})
	s.master.p.signal(syscall.SIGCONT)
	if !ok {
		t.Fatalf("sentinel failover did not complete")
	}
	return d
}

// describe says, for each data server of the set, its role, keys and
// client count: where the fleet's connections went after a failover.
func (s *sentinelSet) describe() string {
	var out []string
	for _, r := range []*redisServer{s.master, s.replica} {
		c := redis.NewClient(&redis.Options{Addr: r.addr(), MaxRetries: -1})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		role, _ := c.Do(ctx, "ROLE").Slice()
		n, _ := c.DBSize(ctx).Result()
		cl, _ := c.ClientList(ctx).Result()
		cancel()
		_ = c.Close()
		r0 := "?"
		if len(role) > 0 {
			r0 = fmt.Sprint(role[0])
		}
		out = append(out, fmt.Sprintf("%s(%s): role=%s keys=%d clients=%d", r.name, r.addr(), r0, n, strings.Count(cl, "\n")))
	}
	return strings.Join(out, "; ")
}

// waitInSync waits until the replica has acknowledged everything the
// master wrote (a planned failover onto a lagging replica loses writes by
// design, which is not what scenario 4 is about).
func (s *sentinelSet) waitInSync(t *testing.T) {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.master.addr()})
	defer c.Close()
	re := regexp.MustCompile(`(?m)^master_repl_offset:(\d+)`)
	reSlave := regexp.MustCompile(`(?m)^slave0:.*state=online,offset=(\d+)`)
	var info string
	if _, ok := waitFor(60*time.Second, 100*time.Millisecond, func() bool {
		info, _ = c.Info(context.Background(), "replication").Result()
		m, r := re.FindStringSubmatch(info), reSlave.FindStringSubmatch(info)
		return m != nil && r != nil && m[1] == r[1]
	}); !ok {
		t.Fatalf("replica not in sync before the failover:\n%s\nreplica log:\n%s", info, tailFile(s.replica.p.logPath, 2000))
	}
}
