package redistest

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ScriptWatch records, through MONITOR, every Lua script a server runs and
// the keys each command inside it touches (COMMAND GETKEYS), so a test
// can prove that every script declares every key it touches: Redis
// Cluster refuses undeclared keys while a slot migrates, Dragonfly always.
type ScriptWatch struct {
	addr string
	conn net.Conn
	done chan struct{}

	mu    sync.Mutex
	lines []string
	err   error
}

// ScriptReport is what a ScriptWatch saw.
type ScriptReport struct {
	// Runs counts the EVAL/EVALSHA calls per script SHA-1 (hex).
	Runs map[string]int
	// Violations lists each command a script ran on a key it did not
	// declare in KEYS (or a Lua command seen outside any script).
	Violations []Violation
}

// Violation is one undeclared key access.
type Violation struct {
	SHA     string   // the script's SHA-1
	Command []string // the command the script ran
	Key     string   // the key it touched
	Keys    []string // the keys the script declared
}

func (v Violation) String() string {
	return fmt.Sprintf("script %s ran %q on key %q, declared keys %q", v.SHA, v.Command, v.Key, v.Keys)
}

// SHA1 returns the SHA-1 (hex) by which EVALSHA names src.
func SHA1(src string) string {
	h := sha1.Sum([]byte(src))
	return hex.EncodeToString(h[:])
}

// WatchScripts starts recording the scripts run on the server at addr.
// Call Report once the operations under test have returned.
func WatchScripts(tb testing.TB, addr string) *ScriptWatch {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		tb.Fatalf("redistest: monitor: %v", err)
	}
	w := &ScriptWatch{addr: addr, conn: conn, done: make(chan struct{})}
	tb.Cleanup(func() { _ = conn.Close(); <-w.done })
	if _, err := conn.Write([]byte("MONITOR\r\n")); err != nil {
		tb.Fatalf("redistest: monitor: %v", err)
	}
	r := bufio.NewReaderSize(conn, 1<<20)
	line, err := r.ReadString('\n')
	if err != nil || line != "+OK\r\n" {
		tb.Fatalf("redistest: monitor: %q %v", line, err)
	}
	go func() {
		defer close(w.done)
		for {
			line, err := r.ReadString('\n')
			w.mu.Lock()
			if err != nil {
				w.err = err
				w.mu.Unlock()
				return
			}
			w.lines = append(w.lines, strings.TrimRight(line, "\r\n"))
			w.mu.Unlock()
		}
	}()
	return w
}

// Report waits until the monitor has seen every command sent before it,
// and returns what the scripts did.
func (w *ScriptWatch) Report(tb testing.TB) ScriptReport {
	tb.Helper()
	ctx := context.Background()
	c := redis.NewClient(&redis.Options{Addr: w.addr})
	defer c.Close()
	marker := fmt.Sprintf("redistest-scriptwatch-%d", time.Now().UnixNano())
	if err := c.Echo(ctx, marker).Err(); err != nil {
		tb.Fatalf("redistest: monitor marker: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	var lines []string
	for {
		w.mu.Lock()
		lines = append(lines[:0], w.lines...)
		err := w.err
		w.mu.Unlock()
		if n := len(lines); n > 0 && strings.Contains(lines[n-1], marker) {
			break
		}
		if err != nil || time.Now().After(deadline) {
			tb.Fatalf("redistest: monitor did not see its marker: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	info, err := c.Command(ctx).Result()
	if err != nil {
		tb.Fatalf("redistest: COMMAND: %v", err)
	}
	rep := ScriptReport{Runs: map[string]int{}}
	type run struct {
		sha  string
		keys []string
	}
	var cur *run
	for _, line := range lines {
		src, args, err := parseMonitorLine(line)
		if err != nil {
			tb.Fatalf("redistest: monitor line %q: %v", line, err)
		}
		if len(args) == 0 {
			continue
		}
		if src != "lua" {
			cur = nil
			switch name := strings.ToLower(args[0]); name {
			case "eval", "evalsha", "eval_ro", "evalsha_ro":
				if len(args) < 3 {
					continue
				}
				n, err := strconv.Atoi(args[2])
				if err != nil || 3+n > len(args) {
					continue
				}
				sha := args[1]
				if !strings.HasPrefix(name, "evalsha") {
					sha = SHA1(args[1])
				}
				sha = strings.ToLower(sha)
				rep.Runs[sha]++
				cur = &run{sha: sha, keys: args[3 : 3+n]}
			}
			continue
		}
		keys, err := commandKeys(ctx, c, info, args)
		if err != nil {
			tb.Fatalf("redistest: keys of %q: %v", args, err)
		}
		for _, k := range keys {
			if cur == nil {
				rep.Violations = append(rep.Violations, Violation{Command: args, Key: k})
				continue
			}
			declared := false
			for _, d := range cur.keys {
				declared = declared || d == k
			}
			if !declared {
				rep.Violations = append(rep.Violations, Violation{SHA: cur.sha, Command: args, Key: k, Keys: cur.keys})
			}
		}
	}
	return rep
}

// commandKeys returns the keys of a command: COMMAND GETKEYS, or none for
// a command whose key specification has no first key (TIME, say).
func commandKeys(ctx context.Context, c *redis.Client, info map[string]*redis.CommandInfo, args []string) ([]string, error) {
	ci := info[strings.ToLower(args[0])]
	if ci == nil {
		return nil, fmt.Errorf("unknown command %q", args[0])
	}
	if ci.FirstKeyPos == 0 && !slices.Contains(ci.Flags, "movablekeys") {
		return nil, nil
	}
	a := make([]any, len(args))
	for i, s := range args {
		a[i] = s
	}
	return c.CommandGetKeys(ctx, a...).Result()
}

// parseMonitorLine splits a MONITOR line,
// `1700000000.123456 [0 127.0.0.1:1234] "SET" "k" "v"`, into its source
// ("127.0.0.1:1234", or "lua" inside a script) and its arguments.
func parseMonitorLine(line string) (src string, args []string, err error) {
	open := strings.IndexByte(line, '[')
	end := strings.IndexByte(line, ']')
	if open < 0 || end < open {
		return "", nil, fmt.Errorf("no source")
	}
	fs := strings.Fields(line[open+1 : end])
	if len(fs) == 2 {
		src = fs[1]
	}
	rest := line[end+1:]
	for {
		rest = strings.TrimLeft(rest, " ")
		if rest == "" {
			return src, args, nil
		}
		if rest[0] != '"' {
			return "", nil, fmt.Errorf("unquoted argument")
		}
		// Find the closing quote, skipping escapes.
		i := 1
		for ; i < len(rest); i++ {
			if rest[i] == '\\' {
				i++
				continue
			}
			if rest[i] == '"' {
				break
			}
		}
		if i >= len(rest) {
			return "", nil, fmt.Errorf("unterminated argument")
		}
		s, err := strconv.Unquote(rest[:i+1])
		if err != nil {
			return "", nil, fmt.Errorf("argument %s: %w", rest[:i+1], err)
		}
		args = append(args, s)
		rest = rest[i+1:]
	}
}
