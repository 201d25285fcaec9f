package bench

import (
	"bytes"
	"context"
	"math"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/state"
)

// TestSmallRun runs every scenario at a tiny size on a private redis-server
// and checks that the table is complete and its figures sane: non-zero,
// ratios computed from the figures of the same run, goals judged from them.
func TestSmallRun(t *testing.T) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("the bench needs redis-server on PATH")
	}
	if testing.Short() {
		t.Skip("a run of about 15 seconds")
	}
	o := Small()
	o.Tasks, o.Connections, o.Duration = 400, 300, 4*time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := Run(ctx, o)
	require.NoError(t, err)

	c := "c=50"
	reval, revalSingle := "periodic revalidation, batches of 50 "+c, "periodic revalidation, 1 task per check "+c
	slowB, slowS := "slow provider c=200, 100ms, batches of 2", "slow provider c=200, 100ms, 1 task per check"
	want := map[string][]string{
		"no-op ceiling " + c:              {"tasks/s", "process CPU per task", "Redis CPU per task", "Redis round trips per task", "Redis commands per task"},
		"first validation " + c:           {"tasks/s", "process CPU per task", "Redis CPU per task", "Redis round trips per task", "Redis commands per task"},
		reval:                             {"checks/s", "process CPU per check", "Redis CPU per check", "Redis round trips per check", "Redis commands per check"},
		revalSingle:                       {"checks/s", "process CPU per check", "Redis CPU per check", "Redis round trips per check", "Redis commands per check"},
		slowB:                             {"checks/s", "peak process RSS"},
		slowS:                             {"checks/s", "peak process RSS"},
		"memory, 300 OAuth connections":   {"Redis bytes per connection"},
		"sweep, 300 due connections":      {"claims+enqueues/s", "Redis CPU per claim"},
		"sweep in batches of 50, 300 due": {"claims/s", "Redis CPU per claim"},
		"freshness, 300 conns, 2s checks, 8s tokens": {"checks done", "check lag behind due, p50", "check lag behind due, p99",
			"tokens expired before refresh", "tokens expired at the end", "checks sent with an expired token"},
	}
	n := 0
	for scenario, figures := range want {
		for _, f := range figures {
			row := r.Row(scenario, f)
			require.NotNil(t, row, "row %q / %q missing", scenario, f)
			n++
		}
	}
	// Figures that must be positive in any run.
	for _, k := range [][2]string{
		{"no-op ceiling " + c, "tasks/s"}, {"no-op ceiling " + c, "Redis round trips per task"},
		{"first validation " + c, "tasks/s"}, {"first validation " + c, "Redis CPU per task"},
		{reval, "checks/s"}, {reval, "Redis round trips per check"},
		{reval, "Redis commands per check"}, {reval, "process CPU per check"},
		{revalSingle, "checks/s"}, {"sweep in batches of 50, 300 due", "claims/s"},
		{slowB, "checks/s"}, {slowB, "peak process RSS"}, {slowS, "checks/s"},
		{"memory, 300 OAuth connections", "Redis bytes per connection"},
		{"sweep, 300 due connections", "claims+enqueues/s"},
		{"freshness, 300 conns, 2s checks, 8s tokens", "checks done"},
		{"freshness, 300 conns, 2s checks, 8s tokens", "check lag behind due, p99"},
	} {
		row := r.Row(k[0], k[1])
		require.Greater(t, row.Value, 0.0, "%s / %s", k[0], k[1])
		require.False(t, math.IsInf(row.Value, 0) || math.IsNaN(row.Value), "%s / %s", k[0], k[1])
	}
	// Ratios: value over the baseline of the same run; the no-op ceiling is
	// the baseline of the validations.
	noop := r.Row("no-op ceiling "+c, "tasks/s")
	for name, unit := range map[string]string{"first validation " + c: "tasks/s", reval: "checks/s"} {
		row := r.Row(name, unit)
		require.Equal(t, noop.Value, row.Baseline, name)
		require.InDelta(t, row.Value/noop.Value, row.Ratio, 1e-9, name)
		require.NotEmpty(t, row.Goal)
	}
	revalRate := r.Row(reval, "checks/s")
	require.Equal(t, revalRate.Value >= noop.Value, revalRate.Pass)
	// One task per check costs at least what a no-op task costs in round
	// trips (the worker reads the connection); a batch shares asynq's
	// round trips among its members, so a check of a batch costs fewer.
	require.Greater(t, r.Row(revalSingle, "Redis round trips per check").Value,
		r.Row("no-op ceiling "+c, "Redis round trips per task").Value)
	require.Less(t, r.Row(reval, "Redis round trips per check").Value,
		r.Row(revalSingle, "Redis round trips per check").Value)
	slow := r.Row(slowB, "checks/s")
	require.Equal(t, 2000.0, slow.Baseline, "C/latency")
	require.LessOrEqual(t, slow.Value, 1.05*slow.Baseline, "no faster than C/latency")
	sweep := r.Row("sweep, 300 due connections", "claims+enqueues/s")
	require.Greater(t, sweep.Baseline, 0.0)
	require.InDelta(t, sweep.Value/sweep.Baseline, sweep.Ratio, 1e-9)
	mem := r.Row("memory, 300 OAuth connections", "Redis bytes per connection")
	require.Greater(t, mem.Value, 300.0, "a 200-char token and a 100-char refresh token, sealed, cannot take less")
	require.Equal(t, mem.Value <= 768, mem.Pass)
	checks := r.Row("freshness, 300 conns, 2s checks, 8s tokens", "checks done")
	require.Greater(t, checks.Baseline, 0.0)
	require.Greater(t, checks.Ratio, 0.2, "checks run on the compressed schedule")

	var out bytes.Buffer
	r.Print(&out)
	text := out.String()
	require.Contains(t, text, "hash-max-listpack-value 1024", "the compose settings are stated")
	require.GreaterOrEqual(t, len(r.Rows), n)
	require.Equal(t, len(r.Rows)+1, strings.Count(text, "|\n"), "one line per row and a header:\n%s", text)
	var md bytes.Buffer
	r.Markdown(&md)
	require.Equal(t, len(r.Rows)+2, strings.Count(md.String(), "\n"))
}

// TestRefusesNonEmptyRedis: the bench never writes into a Redis database
// that holds data unless told it is a scratch one, and never flushes it.
func TestRefusesNonEmptyRedis(t *testing.T) {
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	defer rdb.Close()
	ctx := context.Background()
	require.NoError(t, rdb.Set(ctx, "someone:else", "x", 0).Err())
	_, err := Run(ctx, Options{RedisURL: "redis://" + srv.Addr + "/0", Scenarios: []string{ScenarioMemory}})
	require.ErrorContains(t, err, "holds 1 keys")
	v, err := rdb.Get(ctx, "someone:else").Result()
	require.NoError(t, err)
	require.Equal(t, "x", v)
}

func TestOptionErrors(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Scenarios: []string{"nope"}}, `unknown scenario "nope"`},
		{Options{TokenLifetime: time.Minute, RefreshWindow: time.Minute}, "refresh window 1m0s must be shorter"},
		{Options{CheckInterval: time.Millisecond}, "check interval must be at least 1s"},
		{Options{Concurrency: -1}, "concurrency must be positive"},
	} {
		_, err := Run(context.Background(), tc.o)
		require.ErrorContains(t, err, tc.want)
	}
}

// TestSeededCheckDue: the freshness scenario spreads first checks by
// setting the seeding store's clock back by one check interval; that only
// works while a seeded (verdict written) connection's next check is due
// when the scheduling policy says, one jittered interval after the verdict.
func TestSeededCheckDue(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	p := newProvider(time.Minute)
	defer p.Close()
	cat, err := benchCatalog(p.host, time.Minute, 2*time.Minute, 30*time.Second)
	require.NoError(t, err)
	clock := time.Now().Add(-time.Hour).Truncate(time.Second)
	st, err := newStore(rdb, cat, "vfs", func() time.Time { return clock })
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, seedOAuth(ctx, st, "s", freshConn, 1, false, func(int) time.Time { return time.Now().Add(time.Hour) }))
	due, ok, err := st.OldestDue(ctx, state.IndexCheck, clock.Add(time.Hour))
	require.NoError(t, err)
	require.True(t, ok)
	l, _, err := st.List(ctx, state.Filter{}, "", 10)
	require.NoError(t, err)
	require.Len(t, l, 1)
	c := l[0]
	in, ok := cat.Get(c.ServiceID)
	require.True(t, ok)
	want := state.NextCheckAt(c.Ref(), in, c.State, clock, state.DefaultJitter)
	require.WithinDuration(t, want, due, time.Second,
		"a seeded connection's next check is due when state.NextCheckAt says; the freshness seeding relies on it")
}
