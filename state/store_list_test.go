package state

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
)

// commandCounter is a go-redis hook counting commands by name (pipelined
// ones included) while on.
type commandCounter struct {
	mu sync.Mutex
	on bool
	n  map[string]int
}

func (c *commandCounter) add(cmds ...redis.Cmder) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.on {
		return
	}
	for _, cmd := range cmds {
		c.n[strings.ToLower(cmd.Name())]++
	}
}

func (c *commandCounter) start() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.on, c.n = true, map[string]int{}
}

func (c *commandCounter) stop() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.on = false
	return c.n
}

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.add(cmd)
		return next(ctx, cmd)
	}
}
func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		c.add(cmds...)
		return next(ctx, cmds)
	}
}

// TestListSelectiveFiltersReadWhatTheyReturn lists selective filters over
// 3,000 connections and counts the Redis reads: the work follows the
// matches, not the fleet (it used to read every record for
// ?unified_api=x&limit=1), every page's work is bounded, and paging
// returns each match exactly once.
func TestListSelectiveFiltersReadWhatTheyReturn(t *testing.T) {
	t.Parallel()
	// Two shards: 1,500 BambooHR connections in each, more than one
	// page's scan budget.
	b := setupStore(t, func(c *Config) { c.Shards = 2 })
	ctx := context.Background()
	const bamboo = 3000
	var seed errgroup.Group
	seed.SetLimit(8)
	for i := range bamboo {
		seed.Go(func() error {
			_, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("b%05d", i), ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0)
			return err
		})
	}
	for i := range 5 {
		seed.Go(func() error {
			_, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("z%02d", i), ConnectionID: "ticketing+zendesk"},
				Input{Credentials: map[string]string{"username": "u", "password": "p"}, Settings: map[string]string{"subdomain": "acme"}}, 0)
			return err
		})
	}
	for i := range 6 {
		seed.Go(func() error {
			_, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("h%02d", i), ConnectionID: "crm+hubspot"}, Input{}, 0)
			return err
		})
	}
	require.NoError(t, seed.Wait())
	// Four BambooHR connections become callable.
	for i := range 4 {
		ref := Ref{ConsumerID: fmt.Sprintf("b%05d", i*700), ConnectionID: "hris+bamboohr"}
		c, err := b.store.Get(ctx, ref)
		require.NoError(t, err)
		_, err = b.store.ApplyVerdict(ctx, ref, c.Revision, Verdict{Outcome: OutcomeValid})
		require.NoError(t, err)
	}

	counter := &commandCounter{}
	b.rdb.AddHook(counter)
	type listing struct {
		got            []*Connection
		pages          int
		maxPageRecords int
		ranges, reads  int
	}
	listAll := func(f Filter, limit int) listing {
		var l listing
		cursor := ""
		for {
			counter.start()
			page, next, err := b.store.List(ctx, f, cursor, limit)
			n := counter.stop()
			require.NoError(t, err)
			l.pages++
			l.ranges += n["zrangebylex"]
			l.reads += n["hmget"]
			l.maxPageRecords = max(l.maxPageRecords, n["hmget"])
			l.got = append(l.got, page...)
			if next == "" {
				return l
			}
			require.Less(t, l.pages, 10_000, "the listing does not end")
			cursor = next
		}
	}
	once := func(t *testing.T, l listing, want int, ok func(*Connection) bool) {
		t.Helper()
		require.Len(t, l.got, want)
		seen := map[Ref]bool{}
		for _, c := range l.got {
			require.True(t, ok(c), "%s %s %s", c.Ref(), c.UnifiedAPI, c.State)
			require.False(t, seen[c.Ref()], "%s returned twice", c.Ref())
			seen[c.Ref()] = true
		}
	}

	for _, limit := range []int{1, 2, 50} {
		t.Run(fmt.Sprint("UnifiedAPI", limit), func(t *testing.T) {
			l := listAll(Filter{UnifiedAPI: "ticketing"}, limit)
			once(t, l, 5, func(c *Connection) bool { return c.ServiceID == "zendesk" })
			t.Logf("unified_api=ticketing limit=%d over %d connections: %d pages, %d range reads, %d record reads",
				limit, bamboo+11, l.pages, l.ranges, l.reads)
			require.LessOrEqual(t, l.reads, 5*5, "record reads follow the matches")
			require.LessOrEqual(t, l.ranges, 5*6)
		})
		t.Run(fmt.Sprint("ServiceAndState", limit), func(t *testing.T) {
			l := listAll(Filter{ServiceID: "bamboohr", State: Callable}, limit)
			once(t, l, 4, func(c *Connection) bool { return c.ServiceID == "bamboohr" && c.State == Callable })
			t.Logf("service_id=bamboohr&state=callable limit=%d: %d pages, %d range reads, %d record reads",
				limit, l.pages, l.ranges, l.reads)
			require.LessOrEqual(t, l.reads, 4*4)
			require.LessOrEqual(t, l.ranges, 4*5)
		})
		t.Run(fmt.Sprint("SmallServiceInBigState", limit), func(t *testing.T) {
			l := listAll(Filter{ServiceID: "hubspot", State: Added}, limit)
			once(t, l, 6, func(c *Connection) bool { return c.ServiceID == "hubspot" && c.State == Added })
			require.LessOrEqual(t, l.reads, 6*6)
		})
	}
	// No index narrows unified_api=hris with state=callable to its four
	// matches (the BambooHR index holds 3,000): every page's work is
	// bounded, pages may come back short or empty with a cursor, and the
	// walk still returns each match once.
	t.Run("UnnarrowableBounded", func(t *testing.T) {
		l := listAll(Filter{UnifiedAPI: "hris", State: Callable}, 1)
		once(t, l, 4, func(c *Connection) bool { return c.ServiceID == "bamboohr" && c.State == Callable })
		require.LessOrEqual(t, l.maxPageRecords, listScanBudget+listMinBatch)
		require.Greater(t, l.reads, listScanBudget+listMinBatch, "the budget ended some page early")
		t.Logf("unified_api=hris&state=callable limit=1: %d pages, at most %d record reads per page", l.pages, l.maxPageRecords)
	})
	t.Run("UnfilteredStillExact", func(t *testing.T) {
		l := listAll(Filter{}, 500)
		once(t, l, bamboo+11, func(*Connection) bool { return true })
	})
}

// TestListV1CursorResumes: a cursor from an older release (one walk in lex
// order through the shard) continues a unified_api listing, now walked
// service by service, with each remaining match once and nothing again.
func TestListV1CursorResumes(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 1 })
	ctx := context.Background()
	var members []string
	for i := range 10 {
		consumer := fmt.Sprintf("v%02d", i)
		ref := Ref{ConsumerID: consumer, ConnectionID: "crm+hubspot"}
		in := Input{}
		if i%2 == 1 {
			ref.ConnectionID = "crm+salesforce"
			in = Input{Settings: map[string]string{"instance_url": "https://acme.my.salesforce.com"}}
		}
		_, err := b.store.Put(ctx, ref, in, 0)
		require.NoError(t, err)
		members = append(members, ref.String())
	}
	v1 := base64.RawURLEncoding.EncodeToString([]byte("1:0:" + members[3]))
	page, next, err := b.store.List(ctx, Filter{UnifiedAPI: "crm"}, v1, 100)
	require.NoError(t, err)
	require.Empty(t, next)
	var got []string
	for _, c := range page {
		got = append(got, c.Ref().String())
	}
	require.ElementsMatch(t, members[4:], got)

	// Small pages: the walks of both services resume after the v1
	// position, page after page, each connection once.
	got = nil
	for cur := v1; cur != ""; {
		page, cur, err = b.store.List(ctx, Filter{UnifiedAPI: "crm"}, cur, 2)
		require.NoError(t, err)
		for _, c := range page {
			got = append(got, c.Ref().String())
		}
	}
	require.Equal(t, members[4:], got, "in lex order")
}

// TestListAllWalksEveryServiceOnce: without a filter, List walks the index
// of every service of each shard (there is no index of all connections);
// under concurrent writes, in services seeded and in one that appears
// during the walk, every connection present throughout is returned
// exactly once, and a cursor of the former walk of the all index (v2,
// no service) resumes in lex order across the service indexes.
func TestListAllWalksEveryServiceOnce(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 4 })
	ctx := context.Background()
	conns := []string{"crm+hubspot", "hris+bamboohr", "ticketing+zendesk"}
	inputs := map[string]Input{"crm+hubspot": {}, "hris+bamboohr": bambooInput("k"),
		"ticketing+zendesk": {Settings: map[string]string{"subdomain": "acme"}}}
	const n = 600
	want := map[string]bool{}
	for i := range n {
		ref := Ref{ConsumerID: fmt.Sprintf("p%04d", i), ConnectionID: conns[i%len(conns)]}
		_, err := b.store.Put(ctx, ref, inputs[ref.ConnectionID], 0)
		require.NoError(t, err)
		want[ref.String()] = true
	}

	stop := make(chan struct{})
	var writer errgroup.Group
	writer.Go(func() error {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return nil
			default:
			}
			// Another service (xero) comes and goes between the pages.
			ref := Ref{ConsumerID: fmt.Sprintf("o%04d", i%200), ConnectionID: "accounting+xero"}
			if i%3 == 1 {
				ref.ConnectionID = conns[i%len(conns)]
			}
			var err error
			if i%2 == 0 {
				_, err = b.store.Put(ctx, ref, inputs[ref.ConnectionID], 0)
			} else {
				_, err = b.store.Delete(ctx, ref, 0)
			}
			if err != nil && !errors.Is(err, ErrNotFound) {
				return err
			}
		}
	})
	seen := map[string]int{}
	cursor := ""
	for {
		page, next, err := b.store.List(ctx, Filter{}, cursor, 23)
		require.NoError(t, err)
		for _, c := range page {
			if want[c.Ref().String()] {
				seen[c.Ref().String()]++
			}
		}
		if next == "" {
			break
		}
		cursor = next
	}
	close(stop)
	require.NoError(t, writer.Wait())
	require.Len(t, seen, n)
	for m, k := range seen {
		require.Equal(t, 1, k, m)
	}

	// A cursor of the all index: "2:<shard>:<no service>:<member>".
	sh := b.store.ShardOf("p0100")
	after := Ref{ConsumerID: "p0100", ConnectionID: conns[100%len(conns)]}.String()
	old := base64.RawURLEncoding.EncodeToString([]byte("2:" + fmt.Sprint(sh) + "::" + after))
	var got []string
	cursor = old
	for {
		page, next, err := b.store.List(ctx, Filter{}, cursor, 50)
		require.NoError(t, err)
		for _, c := range page {
			if m := c.Ref().String(); want[m] {
				got = append(got, m)
			}
		}
		if next == "" {
			break
		}
		cursor = next
	}
	var expect []string
	for m := range want {
		ref, _ := parseMember(m)
		if s := b.store.ShardOf(ref.ConsumerID); s > sh || s == sh && m > after {
			expect = append(expect, m)
		}
	}
	require.ElementsMatch(t, expect, got)
}

// TestListScanBudgetEndsAtAWalksStart: a page whose scan budget runs out
// exactly where the next walk (service index) begins gives a cursor that
// resumes there (it once carried "-" as the member and was refused as
// malformed).
func TestListScanBudgetEndsAtAWalksStart(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 1 })
	ctx := context.Background()
	tokens := Input{Credentials: map[string]string{"access_token": "a", "refresh_token": "r",
		"expires_at": storeT0.Add(time.Hour).Format(time.RFC3339)}}
	// hubspot: 1,010 connections, one callable (batches of 150: the walk
	// ends on a short batch with 1,010 >= listScanBudget examined).
	pipe := make(chan int)
	var g errgroup.Group
	for range 8 {
		g.Go(func() error {
			for i := range pipe {
				in := Input{}
				if i == 0 {
					in = tokens
				}
				if _, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("h%04d", i), ConnectionID: "crm+hubspot"}, in, 0); err != nil {
					return err
				}
			}
			return nil
		})
	}
	for i := range 1010 {
		pipe <- i
	}
	close(pipe)
	require.NoError(t, g.Wait())
	sfIn := sfInput("a", "r", storeT0.Add(time.Hour))
	for i := range 5 {
		ch, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("s%d", i), ConnectionID: "crm+salesforce"}, sfIn, 0)
		require.NoError(t, err)
		require.Equal(t, Callable, ch.After.State)
	}
	f := Filter{UnifiedAPI: "crm", State: Callable}
	page, next, err := b.store.List(ctx, f, "", 150)
	require.NoError(t, err)
	require.Len(t, page, 1)
	require.Equal(t, "h0000", page[0].ConsumerID)
	require.NotEmpty(t, next)
	page, next, err = b.store.List(ctx, f, next, 150)
	require.NoError(t, err)
	require.Len(t, page, 5)
	require.Empty(t, next)
}
