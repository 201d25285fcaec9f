package redistest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/freeport"
)

// maxClusterPort keeps every node's cluster bus port (port+10000) a valid
// port.
const maxClusterPort = 55535

// Cluster is a local Redis Cluster of three masters (no replicas), private
// to one test binary or one test.
type Cluster struct {
	// Addrs are the masters' host:port on loopback.
	Addrs []string

	dir   string
	nodes []*exec.Cmd
	// busy is held by the test that owns the cluster: a cluster has only
	// DB 0, and asynq's keys carry no prefix, so one test at a time.
	busy sync.Mutex
}

var (
	sharedCluster     *Cluster
	sharedClusterErr  error
	sharedClusterOnce sync.Once
)

// HaveCluster reports whether redis-server and redis-cli are on PATH.
func HaveCluster() bool {
	_, e1 := exec.LookPath("redis-server")
	_, e2 := exec.LookPath("redis-cli")
	return e1 == nil && e2 == nil
}

// StartCluster returns the package's private three-master cluster,
// starting it on first use (Main, which the package's TestMain must call,
// stops it). It skips the test when
// redis-server or redis-cli is missing. Take it with Client, which gives
// the test the whole cluster, flushed, until the test ends.
func StartCluster(tb testing.TB) *Cluster {
	tb.Helper()
	if !HaveCluster() {
		tb.Skip("redistest: Redis Cluster tests need redis-server and redis-cli on PATH")
	}
	if !inMain {
		tb.Fatal("redistest: StartCluster needs redistest.Main in TestMain to stop the cluster; use NewCluster otherwise")
	}
	sharedClusterOnce.Do(func() { sharedCluster, sharedClusterErr = startCluster() })
	if sharedClusterErr != nil {
		tb.Fatalf("redistest: cluster: %v", sharedClusterErr)
	}
	return sharedCluster
}

// NewCluster starts a cluster owned by the caller and stopped at the end
// of the test (for tests that migrate slots or stop nodes).
func NewCluster(tb testing.TB) *Cluster {
	tb.Helper()
	if !HaveCluster() {
		tb.Skip("redistest: Redis Cluster tests need redis-server and redis-cli on PATH")
	}
	c, err := startCluster()
	if err != nil {
		tb.Fatalf("redistest: cluster: %v", err)
	}
	tb.Cleanup(c.Close)
	return c
}

// URL is the cluster in the form REDIS_URL accepts:
// redis-cluster://host:port,host:port,host:port.
func (c *Cluster) URL() string { return "redis-cluster://" + strings.Join(c.Addrs, ",") }

// Client takes the cluster for the test: it waits until no other test
// holds it, flushes every master, and returns a cluster client closed at
// the end of the test, when the cluster is given back.
func (c *Cluster) Client(tb testing.TB) *redis.ClusterClient {
	tb.Helper()
	c.busy.Lock()
	rdb := c.NewClient()
	ctx := context.Background()
	err := rdb.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
		return n.FlushAll(ctx).Err()
	})
	if err != nil {
		_ = rdb.Close()
		c.busy.Unlock()
		tb.Fatalf("redistest: flush cluster: %v", err)
	}
	tb.Cleanup(func() { _ = rdb.Close(); c.busy.Unlock() })
	return rdb
}

// NewClient returns a new cluster client the caller closes; it does not
// take the cluster (see Client).
func (c *Cluster) NewClient() *redis.ClusterClient {
	return redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs})
}

// Node returns a plain client on one master (for CLUSTER commands), closed
// at the end of the test.
func (c *Cluster) Node(tb testing.TB, addr string) *redis.Client {
	tb.Helper()
	n := redis.NewClient(&redis.Options{Addr: addr})
	tb.Cleanup(func() { _ = n.Close() })
	return n
}

// Close stops every node and removes the cluster's directory.
func (c *Cluster) Close() {
	for _, n := range c.nodes {
		if n.Process != nil {
			_ = n.Process.Kill()
			_ = n.Wait()
		}
	}
	c.nodes = nil
	if c.dir != "" {
		_ = os.RemoveAll(c.dir)
	}
}

func startCluster() (*Cluster, error) {
	var err error
	for range 3 {
		var c *Cluster
		if c, err = tryCluster(); err == nil {
			return c, nil
		}
	}
	return nil, err
}

func tryCluster() (*Cluster, error) {
	dir, err := os.MkdirTemp("", "redistest-cluster-*")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()
	for i := range 3 {
		port, err := clusterPort()
		if err != nil {
			return nil, err
		}
		nd := filepath.Join(dir, strconv.Itoa(i))
		if err := os.Mkdir(nd, 0o700); err != nil {
			return nil, err
		}
		cmd := exec.Command("redis-server",
			"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(nd, "nodes.conf"),
			"--cluster-node-timeout", "5000",
			"--save", "", "--appendonly", "no", "--dir", nd,
			"--protected-mode", "no", "--loglevel", "warning")
		cmd.Stdout, _ = os.Create(filepath.Join(nd, "redis.log"))
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		c.nodes = append(c.nodes, cmd)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if err := waitPing(addr); err != nil {
			return nil, err
		}
		c.Addrs = append(c.Addrs, addr)
	}
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.Command("redis-cli", args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("redis-cli --cluster create: %v: %s", err, out)
	}
	if err := c.waitOK(30 * time.Second); err != nil {
		return nil, err
	}
	ok = true
	return c, nil
}

// waitOK waits until every node says cluster_state:ok and a cluster
// client can write to every master.
func (c *Cluster) waitOK(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for ctx.Err() == nil {
		last = c.allOK(ctx)
		if last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("cluster not ok after %v: %w", timeout, last)
}

func (c *Cluster) allOK(ctx context.Context) error {
	for _, a := range c.Addrs {
		n := redis.NewClient(&redis.Options{Addr: a})
		info, err := n.ClusterInfo(ctx).Result()
		_ = n.Close()
		if err != nil {
			return err
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return fmt.Errorf("node %s: cluster_state not ok", a)
		}
	}
	rdb := c.NewClient()
	defer rdb.Close()
	// Every node must know every other before clients are handed out.
	return rdb.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
		nodes, err := n.ClusterNodes(ctx).Result()
		if err != nil {
			return err
		}
		if strings.Count(nodes, "master") < len(c.Addrs) {
			return errors.New("not every master is known yet")
		}
		return nil
	})
}

func waitPing(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ping(addr) == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("redis-server on %s did not answer PING", addr)
}

// clusterPort returns a free loopback port below maxClusterPort whose bus
// port (port+10000) is free too.
func clusterPort() (int, error) {
	for range 200 {
		p, err := freeport.Loopback()
		if err != nil {
			return 0, err
		}
		if p >= maxClusterPort {
			// The kernel hands out ephemeral ports high; try a random
			// one lower down instead.
			p = 20000 + rand.IntN(maxClusterPort-20000)
		}
		if portFree(p) && portFree(p+10000) {
			return p, nil
		}
	}
	return 0, errors.New("no free port pair below 55535")
}

func portFree(p int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// Owner returns the address of the master that owns key's slot.
func (c *Cluster) Owner(tb testing.TB, key string) string {
	tb.Helper()
	_, owner := c.slotOwner(tb, key)
	return owner
}

func (c *Cluster) slotOwner(tb testing.TB, key string) (int, string) {
	tb.Helper()
	ctx := context.Background()
	n := c.Node(tb, c.Addrs[0])
	slot, err := n.ClusterKeySlot(ctx, key).Result()
	if err != nil {
		tb.Fatalf("redistest: keyslot: %v", err)
	}
	shards, err := n.ClusterShards(ctx).Result()
	if err != nil {
		tb.Fatalf("redistest: cluster shards: %v", err)
	}
	for _, sh := range shards {
		for _, r := range sh.Slots {
			if slot < r.Start || slot > r.End {
				continue
			}
			for _, nd := range sh.Nodes {
				if nd.Role == "master" {
					return int(slot), net.JoinHostPort(nd.IP, strconv.FormatInt(nd.Port, 10))
				}
			}
		}
	}
	tb.Fatalf("redistest: no master owns slot %d", slot)
	return 0, ""
}

// Migration moves one hash slot from its master to another, step by step,
// as redis-cli --cluster reshard does: Begin marks the slot importing on
// the target and migrating on the source, Move migrates some keys, Finish
// migrates the rest and gives the slot to the target on every master.
type Migration struct {
	Slot           int
	Source, Target string // addresses
	c              *Cluster
	tb             testing.TB
	src, dst       *redis.Client
	srcID, dstID   string
}

// BeginMigration starts moving the slot of key to another master.
func (c *Cluster) BeginMigration(tb testing.TB, key string) *Migration {
	tb.Helper()
	ctx := context.Background()
	slot, owner := c.slotOwner(tb, key)
	m := &Migration{Slot: slot, Source: owner, c: c, tb: tb}
	for _, a := range c.Addrs {
		if a != m.Source {
			m.Target = a
			break
		}
	}
	if m.Source == "" || m.Target == "" {
		tb.Fatalf("redistest: slot %d: no source or target master", slot)
	}
	m.src, m.dst = c.Node(tb, m.Source), c.Node(tb, m.Target)
	m.srcID, m.dstID = m.nodeID(m.src), m.nodeID(m.dst)
	m.must(m.dst.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "IMPORTING", m.srcID).Err())
	m.must(m.src.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "MIGRATING", m.dstID).Err())
	return m
}

// Move migrates keys (of the slot) from the source to the target.
func (m *Migration) Move(keys ...string) {
	m.tb.Helper()
	host, port, _ := net.SplitHostPort(m.Target)
	args := []any{"MIGRATE", host, port, "", 0, 5000, "KEYS"}
	for _, k := range keys {
		args = append(args, k)
	}
	m.must(m.src.Do(context.Background(), args...).Err())
}

// Finish migrates the slot's remaining keys and assigns the slot to the
// target on every master.
func (m *Migration) Finish() {
	m.tb.Helper()
	ctx := context.Background()
	for {
		keys, err := m.src.ClusterGetKeysInSlot(ctx, m.Slot, 100).Result()
		m.must(err)
		if len(keys) == 0 {
			break
		}
		m.Move(keys...)
	}
	m.must(m.dst.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err())
	m.must(m.src.Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err())
	for _, a := range m.c.Addrs {
		if a != m.Source && a != m.Target {
			m.must(m.c.Node(m.tb, a).Do(ctx, "CLUSTER", "SETSLOT", m.Slot, "NODE", m.dstID).Err())
		}
	}
	if err := m.c.waitOK(30 * time.Second); err != nil {
		m.tb.Fatalf("redistest: after migration: %v", err)
	}
}

func (m *Migration) nodeID(n *redis.Client) string {
	m.tb.Helper()
	id, err := n.Do(context.Background(), "CLUSTER", "MYID").Text()
	m.must(err)
	return id
}

func (m *Migration) must(err error) {
	m.tb.Helper()
	if err != nil {
		m.tb.Fatalf("redistest: migrate slot %d from %s to %s: %v", m.Slot, m.Source, m.Target, err)
	}
}
