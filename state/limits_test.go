package state

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

func TestRateLimiterPacesOneNameAndLeavesOthersAlone(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	l := NewRateLimiter(rdb, "rl")

	ok, _, err := l.Take(ctx, "acme", 2, time.Minute)
	require.NoError(t, err)
	require.True(t, ok, "the first slot is free")
	ok, after, err := l.Take(ctx, "acme", 2, time.Minute)
	require.NoError(t, err)
	require.False(t, ok, "burst 1: the second waits half the period")
	require.Greater(t, after, 25*time.Second)
	require.LessOrEqual(t, after, 30*time.Second)

	ok, _, err = l.Take(ctx, "other", 2, time.Minute)
	require.NoError(t, err)
	require.True(t, ok, "another name has its own limit")
	require.EqualValues(t, 1, rdb.Exists(ctx, "rate:rl:ratelimit:acme").Val(), "key name unchanged since the worker owned it")

	_, _, err = l.Take(ctx, "acme", 0, time.Minute)
	require.ErrorContains(t, err, "rate limit")
	_, _, err = l.Take(ctx, "acme", 1, 0)
	require.ErrorContains(t, err, "rate limit")
}

func TestWaveCounterAdmitsUpToThresholdWithinTheWindow(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	w := NewWaveCounter(rdb, "")
	t0 := time.UnixMilli(1_800_000_000_000)

	a, err := w.Admit(ctx, "acme", "c1|1", t0, time.Minute, 2)
	require.NoError(t, err)
	require.Equal(t, WaveAdmission{Admitted: true, InWindow: 1}, a)
	a, err = w.Admit(ctx, "acme", "c2|1", t0.Add(10*time.Second), time.Minute, 2)
	require.NoError(t, err)
	require.Equal(t, WaveAdmission{Admitted: true, InWindow: 2}, a)

	// Full: a third member is held, told when the oldest was admitted.
	a, err = w.Admit(ctx, "acme", "c3|1", t0.Add(20*time.Second), time.Minute, 2)
	require.NoError(t, err)
	require.Equal(t, WaveAdmission{Admitted: false, InWindow: 2, Oldest: t0}, a)
	// A member already counted goes ahead again, without counting twice.
	a, err = w.Admit(ctx, "acme", "c1|1", t0.Add(20*time.Second), time.Minute, 2)
	require.NoError(t, err)
	require.Equal(t, WaveAdmission{Admitted: true, InWindow: 2}, a)
	// Another name has its own window.
	a, err = w.Admit(ctx, "other", "c3|1", t0.Add(20*time.Second), time.Minute, 2)
	require.NoError(t, err)
	require.True(t, a.Admitted)

	// Once the oldest has left the window, the held member goes ahead.
	a, err = w.Admit(ctx, "acme", "c3|1", t0.Add(time.Minute+time.Millisecond), time.Minute, 2)
	require.NoError(t, err)
	require.Equal(t, WaveAdmission{Admitted: true, InWindow: 2}, a)
	require.Positive(t, rdb.PTTL(ctx, DefaultPrefix+":wave:acme").Val(), "the window expires when idle")

	_, err = w.Admit(ctx, "acme", "c4|1", t0, 0, 2)
	require.ErrorContains(t, err, "wave")
	_, err = w.Admit(ctx, "acme", "c4|1", t0, time.Minute, 0)
	require.ErrorContains(t, err, "wave")
}
