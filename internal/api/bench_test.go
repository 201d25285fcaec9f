package api_test

import (
	"io"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// BenchmarkGetConnection measures GET one connection through the whole
// stack (httptest server on loopback, auth, real store on a local
// redis-server, credential decryption, JSON) under 64 concurrent clients,
// and reports requests/s and latency percentiles.
//
//	go test -run '^$' -bench GetConnection -benchtime 20000x ./internal/api
func BenchmarkGetConnection(b *testing.B) {
	bb := setup(b)
	path := connPath("bench-consumer", "crm", "pipedrive")
	r := bb.req(b, "PUT", path, `{"credentials":{"api_key":"bench-key"}}`)
	require.Equal(b, http.StatusCreated, r.status)
	benchGET(b, bb.srv.URL+path, http.Header{"Authorization": {"Bearer " + testToken}})
}

// BenchmarkVaultGetConnection is BenchmarkGetConnection through /vault
// (Apideck's headers, envelope and connection view).
//
//	go test -run '^$' -bench VaultGetConnection -benchtime 20000x ./internal/api
func BenchmarkVaultGetConnection(b *testing.B) {
	bb := setup(b)
	r := bb.req(b, "PUT", connPath("bench-consumer", "crm", "pipedrive"), `{"credentials":{"api_key":"bench-key"}}`)
	require.Equal(b, http.StatusCreated, r.status)
	benchGET(b, bb.srv.URL+"/vault/connections/crm/pipedrive", http.Header{"Authorization": {"Bearer " + testToken},
		"X-Apideck-App-Id": {"bench-app"}, "X-Apideck-Consumer-Id": {"bench-consumer"}})
}

// benchGET sends GET url with hdr from 64 concurrent clients and reports
// requests/s and latency percentiles.
func benchGET(b *testing.B, url string, hdr http.Header) {
	const clients = 64
	tr := &http.Transport{MaxIdleConns: clients, MaxIdleConnsPerHost: clients, MaxConnsPerHost: clients}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}

	var mu sync.Mutex
	var all []time.Duration
	b.SetParallelism((clients + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		lat := make([]time.Duration, 0, 1024)
		req, _ := http.NewRequest("GET", url, nil)
		req.Header = hdr.Clone()
		for pb.Next() {
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
			lat = append(lat, time.Since(t0))
		}
		mu.Lock()
		all = append(all, lat...)
		mu.Unlock()
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if len(all) == 0 {
		return
	}
	slices.Sort(all)
	pct := func(p float64) float64 {
		return float64(all[min(len(all)-1, int(float64(len(all))*p))].Microseconds()) / 1000
	}
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "req/s")
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(pct(0.999), "p99.9-ms")
}
