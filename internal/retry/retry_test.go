package retry

import (
	"context"
	"errors"
	"math"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestExp(t *testing.T) {
	for _, tc := range []struct {
		n                   int
		base, ceiling, want time.Duration
	}{
		{-1, time.Second, time.Minute, time.Second},
		{0, time.Second, time.Minute, time.Second},
		{1, time.Second, time.Minute, 2 * time.Second},
		{5, time.Second, time.Minute, 32 * time.Second},
		{6, time.Second, time.Minute, time.Minute},
		{math.MaxInt, time.Second, time.Minute, time.Minute},
		{100, time.Hour, math.MaxInt64, math.MaxInt64},
		{0, time.Hour, time.Minute, time.Minute},
	} {
		assert.Equal(t, tc.want, Exp(tc.n, tc.base, tc.ceiling), "Exp(%d, %s, %s)", tc.n, tc.base, tc.ceiling)
	}
}

func TestSpread(t *testing.T) {
	assert.Equal(t, 80*time.Second, Spread(100*time.Second, 0.2, 0))
	assert.Equal(t, 100*time.Second, Spread(100*time.Second, 0.2, 0.5))
	assert.Equal(t, 119*time.Second, Spread(100*time.Second, 0.2, 0.975))
	assert.Equal(t, 100*time.Second, Spread(100*time.Second, 0, 0))
}

func TestBetweenAndUp(t *testing.T) {
	for range 1000 {
		d := Between(time.Second, 3*time.Second)
		require.GreaterOrEqual(t, d, time.Second)
		require.Less(t, d, 3*time.Second)
		u := Up(10*time.Second, 0.5)
		require.GreaterOrEqual(t, u, 10*time.Second)
		require.LessOrEqual(t, u, 15*time.Second)
	}
	assert.Equal(t, time.Second, Between(time.Second, time.Second/2))
	assert.Equal(t, time.Duration(0), Up(-time.Second, 0.5))
}

func TestSleep(t *testing.T) {
	require.NoError(t, Sleep(context.Background(), time.Millisecond))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	require.ErrorIs(t, Sleep(ctx, time.Hour), context.Canceled)
	require.Less(t, time.Since(start), time.Minute)
	require.ErrorIs(t, Sleep(ctx, 0), context.Canceled)
}

func TestAfterError(t *testing.T) {
	cause := errors.New("HTTP 429")
	err := error(&AfterError{After: 1500 * time.Microsecond, Err: cause})
	assert.Equal(t, "HTTP 429 (retry after 2ms)", err.Error())
	assert.ErrorIs(t, err, cause)
	var ae *AfterError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, 1500*time.Microsecond, ae.After)
}

func TestParseAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false},
		{"120", 2 * time.Minute, true},
		{" 7 ", 7 * time.Second, true},
		{"0", 0, true},
		{"-1", 0, false},
		{"soon", 0, false},
		{"1.5", 0, false},
		{"99999999999999999", 365 * 24 * time.Hour, true},
		{now.Add(time.Minute).Format(http.TimeFormat), time.Minute, true},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0, true},
		{now.Add(10 * 365 * 24 * time.Hour).Format(http.TimeFormat), 365 * 24 * time.Hour, true},
	} {
		d, ok := ParseAfter(tc.in, now)
		assert.Equal(t, tc.want, d, "ParseAfter(%q)", tc.in)
		assert.Equal(t, tc.ok, ok, "ParseAfter(%q) ok", tc.in)
	}
	h := http.Header{}
	assert.Equal(t, time.Duration(0), HeaderAfter(h, now))
	h.Set("Retry-After", "3")
	assert.Equal(t, 3*time.Second, HeaderAfter(h, now))
}
