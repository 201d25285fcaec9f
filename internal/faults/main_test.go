package faults

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// Suite-wide state set up once by TestMain.
var (
	// binPath is the vaultfleet binary built for this run.
	binPath string
	// skipReason is set when the suite cannot run here (no redis-server).
	skipReason string
	// full selects the full form (VAULTFLEET_FAULTS=full).
	full = os.Getenv("VAULTFLEET_FAULTS") == "full"
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	// The scenarios mostly wait on their fleets: run three at once unless
	// -parallel says otherwise (the default, GOMAXPROCS, is 2 on CI).
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", "3")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		skipReason = "the fault suite runs real redis-server processes (AOF, Sentinel) and none is on PATH: install redis-server to run it"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "vaultfleet-faults-*")
	if err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	binPath = filepath.Join(dir, "vaultfleet")
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	start := time.Now()
	cmd := exec.Command("go", "build", "-o", binPath, "./cmd/vaultfleet")
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "faults: go build ./cmd/vaultfleet:", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "faults: built vaultfleet in %s; form: %s\n", time.Since(start).Round(time.Millisecond), form())
	return m.Run()
}

func form() string {
	if full {
		return "full (VAULTFLEET_FAULTS=full)"
	}
	return "short"
}

// needSuite skips t when the suite cannot run on this machine.
func needSuite(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

// pick returns short in the short form and long in the full form.
func pick[T any](short, long T) T {
	if full {
		return long
	}
	return short
}
