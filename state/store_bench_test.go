package state

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// Run with: go test -run '^$' -bench . -benchmem ./state

const benchConns = 1000

// randToken returns a token of n URL-safe characters, like real ones.
func randToken(rng *rand.Rand, n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
	b := make([]byte, n)
	for i := range b {
		b[i] = alphabet[rng.IntN(len(alphabet))]
	}
	return string(b)
}

func benchRef(i int) Ref {
	return Ref{ConsumerID: fmt.Sprintf("consumer-%06d", i), ConnectionID: "crm+salesforce"}
}

// seedOAuth stores n Salesforce connections with realistic tokens (200
// and 100 characters), an instance_url and a valid verdict, from 8
// goroutines.
func seedOAuth(tb testing.TB, s *Store, n int) {
	tb.Helper()
	ctx := context.Background()
	now := s.now()
	var g errgroup.Group
	g.SetLimit(8)
	for w := range 8 {
		g.Go(func() error {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := w; i < n; i += 8 {
				ref := benchRef(i)
				in := Input{
					Credentials: map[string]string{
						"access_token":  "00D" + randToken(rng, 197),
						"refresh_token": "5Aep" + randToken(rng, 96),
						"expires_at":    now.Add(2 * time.Hour).Format(time.RFC3339),
					},
					Settings: map[string]string{"instance_url": fmt.Sprintf("https://acme-%d.my.salesforce.com", i)},
				}
				ch, err := s.Put(ctx, ref, in, 0)
				if err != nil {
					return err
				}
				if _, err := s.ApplyVerdict(ctx, ref, ch.After.Revision, Verdict{Outcome: OutcomeValid,
					Reason: ReasonCheckPassed, HTTPStatus: 200}); err != nil {
					return err
				}
			}
			return nil
		})
	}
	require.NoError(tb, g.Wait())
}

func benchStore(b *testing.B, n int) *Store {
	b.Helper()
	bundle := setupStore(b)
	seedOAuth(b, bundle.store, n)
	return bundle.store
}

func BenchmarkGet(b *testing.B) {
	s := benchStore(b, benchConns)
	ctx := context.Background()
	i := 0
	for b.Loop() {
		if _, err := s.Get(ctx, benchRef(i%benchConns)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkApplyVerdict(b *testing.B) {
	s := benchStore(b, benchConns)
	ctx := context.Background()
	revs := make([]int64, benchConns)
	for i := range revs {
		c, err := s.Get(ctx, benchRef(i))
		require.NoError(b, err)
		revs[i] = c.Revision
	}
	i := 0
	for b.Loop() {
		o := OutcomeValid
		if i%2 == 1 {
			o = OutcomeInvalid // alternate, so that state, indexes and counts move
		}
		if _, err := s.ApplyVerdict(ctx, benchRef(i%benchConns), revs[i%benchConns], Verdict{Outcome: o}); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func BenchmarkList(b *testing.B) {
	s := benchStore(b, benchConns)
	ctx := context.Background()
	cursor := ""
	for b.Loop() {
		page, next, err := s.List(ctx, Filter{}, cursor, 50)
		if err != nil {
			b.Fatal(err)
		}
		if len(page) == 0 && cursor == "" {
			b.Fatal("empty first page")
		}
		cursor = next // "" after the last page: start over
	}
}

// BenchmarkMemoryPerConnection stores 10,000 OAuth connections on a fresh
// redis-server and reports the growth of used_memory per connection,
// records and every index entry included (the event stream is dropped
// before measuring: its length is capped by EventMaxLen, not by the number
// of connections). RedisDefaults runs with redis-server's defaults;
// Listpack with hash-max-listpack-value 1024 and zset-max-listpack-entries
// 1024, which keep records and index zsets in the compact listpack
// encoding (an operator's choice: listpack operations are O(n)). Run it
// once: -bench MemoryPerConnection -benchtime 1x.
func BenchmarkMemoryPerConnection(b *testing.B) {
	const n = 10_000
	srv := redistest.New(b)
	if !srv.Real {
		b.Skip("memory figures need redis-server")
	}
	rdb := srv.Client(b)
	ctx := context.Background()
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(b, err)
	s, err := New(Config{Client: rdb, Catalog: storeCatalog(b), Keys: keys})
	require.NoError(b, err)

	for _, bc := range []struct {
		name   string
		config map[string]string
	}{
		{name: "RedisDefaults", config: map[string]string{"hash-max-listpack-value": "64", "zset-max-listpack-entries": "128"}},
		{name: "HashListpack", config: map[string]string{"hash-max-listpack-value": "1024", "zset-max-listpack-entries": "128"}},
		{name: "Listpack", config: map[string]string{"hash-max-listpack-value": "1024", "zset-max-listpack-entries": "1024"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for k, v := range bc.config {
				require.NoError(b, rdb.ConfigSet(ctx, k, v).Err())
			}
			var perConn, record, indexes float64
			for b.Loop() {
				require.NoError(b, rdb.FlushDB(ctx).Err())
				before := usedMemory(b, rdb)
				seedOAuth(b, s, n)
				require.NoError(b, rdb.Del(ctx, s.cfg.EventStream).Err())
				after := usedMemory(b, rdb)
				perConn = float64(after-before) / n

				ref := benchRef(n / 2)
				rec, err := rdb.MemoryUsage(ctx, s.keysOf(ref).record(ref.String()), 0).Result()
				require.NoError(b, err)
				record = float64(rec)

				var idx int64
				for sh := range s.Shards() {
					k := s.shardKeys(sh)
					for _, key := range []string{k.state(Callable), k.service("salesforce"),
						k.due(IndexCheck), k.due(IndexRefresh), k.counts()} {
						u, err := rdb.MemoryUsage(ctx, key, 0).Result()
						if err == redis.Nil {
							continue
						}
						require.NoError(b, err)
						idx += u
					}
				}
				indexes = float64(idx) / n
			}
			b.ReportMetric(perConn, "B/conn")
			b.ReportMetric(record, "record-B")
			b.ReportMetric(indexes, "index-B/conn")
			b.Logf("%d OAuth connections: used_memory grew %.0f B per connection; MEMORY USAGE of one record %.0f B; "+
				"index keys (state, service, due:check, due:refresh, counts) %.0f B per connection",
				n, perConn, record, indexes)
		})
	}
}

func usedMemory(tb testing.TB, rdb *redis.Client) int64 {
	tb.Helper()
	info, err := rdb.Info(context.Background(), "memory").Result()
	require.NoError(tb, err)
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "used_memory:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			require.NoError(tb, err)
			return n
		}
	}
	tb.Fatal("no used_memory in INFO memory")
	return 0
}
