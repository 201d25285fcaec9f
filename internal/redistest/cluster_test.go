package redistest

import (
	"context"
	"fmt"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

// TestClusterSpreadsKeys: the cluster has three masters, each owning
// slots, and a cluster client reaches keys on all of them.
func TestClusterSpreadsKeys(t *testing.T) {
	c := StartCluster(t)
	if len(c.Addrs) != 3 {
		t.Fatalf("want 3 masters, got %v", c.Addrs)
	}
	rdb := c.Client(t)
	ctx := context.Background()
	for i := range 100 {
		if err := rdb.Set(ctx, fmt.Sprint("k", i), i, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	total := 0
	for _, a := range c.Addrs {
		size, err := c.Node(t, a).DBSize(ctx).Result()
		if err != nil {
			t.Fatal(err)
		}
		if size == 0 {
			t.Errorf("master %s holds no key", a)
		}
		total += int(size)
	}
	if total != 100 {
		t.Fatalf("want 100 keys across masters, got %d", total)
	}
}
