package events

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestRelayBackoff: 100ms doubling per failure up to the maximum, ±25%.
func TestRelayBackoff(t *testing.T) {
	t.Parallel()
	for n := 1; n <= 12; n++ {
		want := min(100*time.Millisecond<<(n-1), time.Second)
		for range 100 {
			d := backoff(n, time.Second)
			require.GreaterOrEqual(t, d, want*3/4, "failure %d", n)
			require.LessOrEqual(t, d, want*5/4, "failure %d", n)
		}
	}
}
