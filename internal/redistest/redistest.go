// Package redistest starts a private redis-server per test package on a free
// loopback port, so packages running in parallel never share or flush each
// other's data. Only where no redis-server binary exists does it fall back
// to miniredis, and it says so in the test output.
package redistest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/freeport"
)

// Server is a Redis server private to one test binary.
type Server struct {
	// Addr is host:port on loopback.
	Addr string
	// Real is false when miniredis stands in for redis-server.
	Real bool

	cmd  *exec.Cmd
	mini *miniredis.Miniredis
	dir  string
	next int
	// used has bit n set while database n belongs to a test; free
	// signals a database given back.
	used uint16
	free *sync.Cond
	mu   sync.Mutex
}

var (
	// inMain is set by Main, which stops the shared servers at exit.
	inMain     bool
	shared     *Server
	sharedErr  error
	sharedOnce sync.Once
)

// Main runs a test binary's tests around one private server. Use it from
// TestMain: func TestMain(m *testing.M) { redistest.Main(m) }.
func Main(m *testing.M) {
	inMain = true
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	if sharedCluster != nil {
		sharedCluster.Close()
	}
	os.Exit(code)
}

// Start returns the package's private server, starting it on first use.
// Each caller should take its own DB with Client (databases 0..15) or its
// own key prefix.
func Start(tb testing.TB) *Server {
	tb.Helper()
	sharedOnce.Do(func() { shared, sharedErr = start() })
	if sharedErr != nil {
		tb.Fatalf("redistest: %v", sharedErr)
	}
	if !shared.Real {
		tb.Log("redistest: no redis-server on PATH; miniredis stands in for Redis in this test")
	}
	return shared
}

// New starts a fresh server owned by the caller and stopped at the end of
// the test (for tests that stop or restart Redis, or fill it).
func New(tb testing.TB) *Server {
	tb.Helper()
	s, err := start()
	if err != nil {
		tb.Fatalf("redistest: %v", err)
	}
	if !s.Real {
		tb.Log("redistest: no redis-server on PATH; miniredis stands in for Redis in this test")
	}
	tb.Cleanup(s.Close)
	return s
}

// Client returns a client on a database of its own, flushed first, and
// closed at the end of the test. A database (0..15) belongs to one test
// until that test ends: when all 16 are taken, Client waits for one to be
// given back, so a test's data is never flushed by another's.
func (s *Server) Client(tb testing.TB) *redis.Client {
	tb.Helper()
	db := s.takeDB()
	c := redis.NewClient(&redis.Options{Addr: s.Addr, DB: db})
	if err := c.FlushDB(context.Background()).Err(); err != nil {
		s.giveDB(db)
		tb.Fatalf("redistest: flush db %d: %v", db, err)
	}
	tb.Cleanup(func() { _ = c.Close(); s.giveDB(db) })
	return c
}

// takeDB waits for a free database and takes it.
func (s *Server) takeDB() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.free == nil {
		s.free = sync.NewCond(&s.mu)
	}
	for {
		for i := range 16 {
			db := (s.next + i) % 16
			if s.used&(1<<db) == 0 {
				s.used |= 1 << db
				s.next = db + 1
				return db
			}
		}
		s.free.Wait()
	}
}

// giveDB gives a database back.
func (s *Server) giveDB(db int) {
	s.mu.Lock()
	s.used &^= 1 << db
	if s.free != nil {
		s.free.Broadcast()
	}
	s.mu.Unlock()
}

// Close stops the server and removes its directory.
func (s *Server) Close() {
	if s.mini != nil {
		s.mini.Close()
		return
	}
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
}

// Stop kills the server (to test outages); Restart brings it back on the
// same port. Not available on miniredis.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// Pause stops the server's process with SIGSTOP: connections stay open
// and nothing answers, as with a stalled Redis. Resume (registered as a
// cleanup too) continues it. Not available on miniredis.
func (s *Server) Pause(tb testing.TB) {
	tb.Helper()
	if !s.Real || s.cmd == nil || s.cmd.Process == nil {
		tb.Skip("redistest: pause needs redis-server")
	}
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		tb.Fatalf("redistest: pause: %v", err)
	}
	tb.Cleanup(s.Resume)
}

// Resume continues a paused server.
func (s *Server) Resume() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// Restart starts a stopped server again on the same address (empty).
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	if !s.Real {
		tb.Skip("redistest: restart needs redis-server")
	}
	_, port, _ := net.SplitHostPort(s.Addr)
	p, _ := strconv.Atoi(port)
	if err := s.launch(p); err != nil {
		tb.Fatalf("redistest: restart: %v", err)
	}
}

func start() (*Server, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		m, err := miniredis.Run()
		if err != nil {
			return nil, err
		}
		return &Server{Addr: m.Addr(), mini: m}, nil
	}
	dir, err := os.MkdirTemp("", "redistest-*")
	if err != nil {
		return nil, err
	}
	s := &Server{Real: true, dir: dir}
	var lastErr error
	for range 5 {
		port, err := freeport.Loopback()
		if err != nil {
			return nil, err
		}
		if lastErr = s.launch(port); lastErr == nil {
			return s, nil
		}
	}
	_ = os.RemoveAll(dir)
	return nil, lastErr
}

func (s *Server) launch(port int) error {
	cmd := exec.Command("redis-server",
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--protected-mode", "no", "--databases", "16", "--loglevel", "warning")
	cmd.Stdout, _ = os.Create(filepath.Join(s.dir, "redis.log"))
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ping(addr) == nil {
			s.cmd, s.Addr = cmd, addr
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	return fmt.Errorf("redis-server on %s did not answer PING", addr)
}

func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("unexpected reply %q", line)
	}
	return nil
}
