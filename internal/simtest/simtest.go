// Package simtest starts, for a test, the simulated providers of
// internal/sim and a store over their catalog on a private Redis: the
// common ground of the connect flow's, the Vault page's and the session
// API's tests.
package simtest

import (
	"context"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/state"
)

// Env is what Start made; everything stops when the test ends.
type Env struct {
	Providers *sim.Providers
	Catalog   *catalog.Catalog
	Redis     *redis.Client
	Store     *state.Store
}

// Start runs the simulated providers, parses their catalog and opens a
// store on a database of the package's private Redis.
func Start(t testing.TB) *Env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	p, err := sim.Start(ctx, sim.Config{})
	if err != nil {
		t.Fatalf("simtest: start providers: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	cat, err := catalog.Parse(p.CatalogYAML())
	if err != nil {
		t.Fatalf("simtest: catalog: %v", err)
	}
	rdb := redistest.Start(t).Client(t)
	ring, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	if err != nil {
		t.Fatalf("simtest: keyring: %v", err)
	}
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: ring})
	if err != nil {
		t.Fatalf("simtest: store: %v", err)
	}
	return &Env{Providers: p, Catalog: cat, Redis: rdb, Store: st}
}
