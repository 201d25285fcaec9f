package faults

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// proc is one real process of the fleet (or a redis-server), its stderr
// captured to a file that is dumped when the test fails.
type proc struct {
	name    string
	args    []string
	env     []string
	logPath string
	addr    string // ops or API address, once known

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	exit   error
	killed bool
}

var addrRE = regexp.MustCompile(`"addr":"(127\.0\.0\.1:\d+)"`)

// procs owns every process a test starts; they are all stopped (SIGTERM,
// then SIGKILL) in t.Cleanup and their logs dumped if the test failed.
type procs struct {
	t   *testing.T
	dir string

	mu  sync.Mutex
	all []*proc
	seq map[string]int
}

func newProcs(t *testing.T, dir string) *procs {
	ps := &procs{t: t, dir: dir, seq: map[string]int{}}
	t.Cleanup(ps.cleanup)
	return ps
}

func (ps *procs) cleanup() {
	ps.mu.Lock()
	all := append([]*proc(nil), ps.all...)
	ps.mu.Unlock()
	// The fleet first, then Redis, so that no process shuts down against
	// a Redis that is already gone.
	stopAll := func(redisToo bool) {
		var wg sync.WaitGroup
		for _, p := range all {
			if strings.HasPrefix(p.name, "redis") || strings.HasPrefix(p.name, "sentinel") {
				if !redisToo {
					continue
				}
			}
			wg.Add(1)
			go func() { defer wg.Done(); p.stop(30 * time.Second) }()
		}
		wg.Wait()
	}
	stopAll(false)
	stopAll(true)
	if ps.t.Failed() {
		for _, p := range all {
			ps.t.Logf("---- tail of %s (%s) ----\n%s", p.name, p.logPath, tailFile(p.logPath, 1500))
		}
	}
}

// start runs bin with args and env; wantAddr waits for the process to log
// the address it listens on.
func (ps *procs) start(name, bin string, args, env []string, wantAddr bool) *proc {
	t := ps.t
	t.Helper()
	ps.mu.Lock()
	ps.seq[name]++
	n := ps.seq[name]
	ps.mu.Unlock()
	p := &proc{name: fmt.Sprintf("%s-%d", name, n), args: append([]string{bin}, args...), env: env,
		logPath: filepath.Join(ps.dir, fmt.Sprintf("%s-%d.log", name, n))}
	if err := p.launch(); err != nil {
		t.Fatalf("start %s: %v", p.name, err)
	}
	ps.mu.Lock()
	ps.all = append(ps.all, p)
	ps.mu.Unlock()
	if wantAddr {
		deadline := time.Now().Add(30 * time.Second)
		for p.addr == "" {
			if m := addrRE.FindSubmatch(readFile(p.logPath)); m != nil {
				p.addr = string(m[1])
				break
			}
			if p.exited() {
				t.Fatalf("%s exited before it listened: %v\n%s", p.name, p.exitErr(), tailFile(p.logPath, 3000))
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not log its address within 30s:\n%s", p.name, tailFile(p.logPath, 3000))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return p
}

func (p *proc) launch() error {
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.args[0], p.args[1:]...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group: a test's signal never reaches the test binary.
	// Pdeathsig: if the test binary dies (a -timeout panic), so does the
	// process, instead of lingering.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.done, p.exit, p.killed = cmd, done, nil, false
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.exit = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

func (p *proc) exited() bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil {
		return true
	}
	select {
	case <-done:
		return true
	default:
		return false
	}
}

func (p *proc) exitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit
}

func (p *proc) signal(sig syscall.Signal) {
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if cmd != nil && cmd.Process != nil && !p.exited() {
		_ = cmd.Process.Signal(sig)
	}
}

// kill9 kills the process at once and waits for it to be gone.
func (p *proc) kill9() {
	p.mu.Lock()
	p.killed = true
	done := p.done
	p.mu.Unlock()
	p.signal(syscall.SIGKILL)
	if done != nil {
		<-done
	}
}

// stop sends SIGTERM and waits up to grace for the exit, then SIGKILL. It
// returns how long the process took and whether it exited by itself.
func (p *proc) stop(grace time.Duration) (time.Duration, bool) {
	start := time.Now()
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done == nil || p.exited() {
		return 0, true
	}
	p.signal(syscall.SIGTERM)
	select {
	case <-done:
		return time.Since(start), true
	case <-time.After(grace):
	}
	p.kill9()
	return time.Since(start), false
}

// log returns what the process wrote so far.
func (p *proc) log() string { return string(readFile(p.logPath)) }

func readFile(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}

func tailFile(path string, n int) string {
	b := readFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return string(b)
}

// freePort returns a port on loopback that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// baseEnv is the environment every fleet process starts from: PATH and
// HOME only, so nothing of the developer's shell leaks in.
func baseEnv(vars map[string]string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	keys := make([]string, 0, len(vars))
	for k := range vars {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+vars[k])
	}
	return env
}

// waitFor polls cond until it holds or d passes; it returns how long it
// took and whether cond held.
func waitFor(d, every time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	deadline := start.Add(d)
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Now().After(deadline) {
			return time.Since(start), false
		}
		time.Sleep(every)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
