package state

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// BenchmarkResealAll measures a key rotation: 20,000 records written under
// k1, resealed under k2 (first run), then the rerun that finds nothing to
// do. Run it with -benchtime 1x.
func BenchmarkResealAll(b *testing.B) {
	srv := redistest.New(b)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	b.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	open := func(spec string) *Store {
		keys, err := secrets.ParseKeyring(spec)
		require.NoError(b, err)
		s, err := New(Config{Client: rdb, Catalog: storeCatalog(b), Keys: keys})
		require.NoError(b, err)
		return s
	}
	k1, k2 := secrets.NewKey("k1"), secrets.NewKey("k2")
	const n = 20_000
	for b.Loop() {
		b.StopTimer()
		require.NoError(b, rdb.FlushDB(ctx).Err())
		old := open(k1)
		for i := range n {
			_, err := old.Put(ctx, Ref{ConsumerID: fmt.Sprintf("m%05d", i), ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0)
			require.NoError(b, err)
		}
		rotated := open(k2 + "," + k1)
		b.StartTimer()
		start := time.Now()
		p, err := rotated.ResealAll(ctx, nil)
		first := time.Since(start)
		require.NoError(b, err)
		require.Equal(b, n, p.Resealed)
		start = time.Now()
		p, err = rotated.ResealAll(ctx, nil)
		again := time.Since(start)
		require.NoError(b, err)
		require.Equal(b, n, p.Current)
		b.ReportMetric(float64(n)/first.Seconds(), "resealed/s")
		b.ReportMetric(float64(n)/again.Seconds(), "rerun_records/s")
	}
}
