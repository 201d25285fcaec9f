// Package procstat reads this process's own resource use, for the
// benchmarks: CPU time, resident memory, and their peaks while something
// runs. One home for what the bench command and the packages' Go
// benchmarks measure alike.
package procstat

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// CPU returns the user and system CPU time this process has used so far.
func CPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// RSS returns this process's resident set size in bytes
// (/proc/self/statm), or 0 where that cannot be read.
func RSS() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * uint64(os.Getpagesize())
}

// Peaks are the highest readings Sample saw.
type Peaks struct {
	// RSS is the process's resident set size, in bytes.
	RSS uint64
	// HeapInuse and Sys are the Go runtime's (runtime.MemStats).
	HeapInuse, Sys uint64
}

// Sample reads RSS and the Go heap at once and then every interval until
// stop is called; stop takes one last reading and returns the peaks.
func Sample(every time.Duration) (stop func() Peaks) {
	var mu sync.Mutex
	var p Peaks
	read := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		r := RSS()
		mu.Lock()
		p.RSS, p.HeapInuse, p.Sys = max(p.RSS, r), max(p.HeapInuse, ms.HeapInuse), max(p.Sys, ms.Sys)
		mu.Unlock()
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			read()
			select {
			case <-quit:
				return
			case <-t.C:
			}
		}
	})
	return func() Peaks {
		close(quit)
		wg.Wait()
		read()
		mu.Lock()
		defer mu.Unlock()
		return p
	}
}
