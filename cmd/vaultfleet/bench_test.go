package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestBenchCommand runs a tiny memory scenario through the command line and
// checks the flags' errors; internal/bench tests the scenarios themselves.
func TestBenchCommand(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("vaultfleet bench needs redis-server on PATH")
	}
	env, out, errOut := testEnv(nil)
	prof := filepath.Join(t.TempDir(), "cpu.pprof")
	code := run(context.Background(), []string{"bench", "--small", "--scenarios", "memory", "--connections", "200",
		"--cpuprofile", prof, "--profile-scenario", "memory", "--markdown"}, env)
	require.Equal(t, 0, code, errOut.String())
	require.Contains(t, out.String(), "memory, 200 OAuth connections")
	require.Contains(t, out.String(), "| memory, 200 OAuth connections | Redis bytes per connection |")
	require.Contains(t, out.String(), "--hash-max-listpack-value 1024")
	st, err := os.Stat(prof)
	require.NoError(t, err)
	require.Positive(t, st.Size(), "the CPU profile was written")

	for _, args := range [][]string{{"bench", "--bogus"}, {"bench", "extra"}} {
		env, _, _ := testEnv(nil)
		require.Equal(t, 2, run(context.Background(), args, env), "%v", args)
	}
	env, _, errOut = testEnv(nil)
	require.Equal(t, 1, run(context.Background(), []string{"bench", "--scenarios", "noop", "--cpuprofile", filepath.Join(t.TempDir(), "p"),
		"--profile-scenario", "sweep"}, env))
	require.Contains(t, errOut.String(), `the profiled scenario "sweep" is not among those to run`)
	env, _, errOut = testEnv(map[string]string{"REDIS_URL": "redis://127.0.0.1:1/0"})
	require.Equal(t, 1, run(context.Background(), []string{"bench", "--scenarios", "memory"}, env))
	require.Contains(t, errOut.String(), "vaultfleet bench: redis:")
}
