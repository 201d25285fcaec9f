package procstat

import (
	"runtime"
	"testing"
	"time"
)

// TestReadings: the CPU time grows with work, RSS is the resident size
// (on Linux), and Sample's peaks cover memory held while it ran.
func TestReadings(t *testing.T) {
	c0 := CPU()
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	if CPU() <= c0 {
		t.Fatalf("CPU did not grow: %v then %v", c0, CPU())
	}
	if runtime.GOOS == "linux" && RSS() == 0 {
		t.Fatal("RSS is 0 on Linux")
	}
	stop := Sample(5 * time.Millisecond)
	held := make([]byte, 64<<20)
	for i := range held {
		held[i] = 1
	}
	time.Sleep(20 * time.Millisecond)
	p := stop()
	runtime.KeepAlive(held)
	if p.HeapInuse < 64<<20 {
		t.Fatalf("peak heap %d below the 64 MiB held", p.HeapInuse)
	}
	if runtime.GOOS == "linux" && p.RSS < 64<<20 {
		t.Fatalf("peak RSS %d below the 64 MiB touched", p.RSS)
	}
}
