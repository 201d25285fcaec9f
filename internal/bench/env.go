package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

// Integrations of the bench catalog.
const (
	// keyService: an API-key integration whose check answers 200 (the
	// throughput scenarios).
	keyService = "acme"
	keyConn    = "crm+acme"
	// oauthService: OAuth connections of the memory and sweep scenarios,
	// with the catalog's default intervals.
	oauthService = "oco"
	oauthConn    = "accounting+oco"
	// freshService: OAuth connections on the compressed schedule of the
	// freshness scenario.
	freshService = "ofresh"
	freshConn    = "accounting+ofresh"
)

// Environment variables of the bench's OAuth client, which the worker reads
// through Config.Getenv (never from the process environment).
const (
	clientIDEnv     = "BENCH_CLIENT_ID"
	clientSecretEnv = "BENCH_CLIENT_SECRET"
)

func benchGetenv(name string) string {
	switch name {
	case clientIDEnv:
		return "bench-client"
	case clientSecretEnv:
		return "bench-client-secret"
	}
	return ""
}

const catalogYAML = `
integrations:
  - id: acme
    name: Acme
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: http://HOST/check
      auth: {scheme: header, name: X-Api-Token, field: api_key}
      timeout: 5s
    allow_http: true
    allowed_hosts: ["HOST"]
  - id: oco
    name: OCo
    unified_api: accounting
    auth_type: oauth2
    status: live
    settings:
      - {name: instance_url, type: url}
    check: &check # ofresh shares these (a YAML alias)
      url: http://HOST/check
      timeout: 5s
    oauth: &oauth
      token_url: http://HOST/token
      client_id_env: BENCH_CLIENT_ID
      client_secret_env: BENCH_CLIENT_SECRET
      auth_style: header
    token_lifetime: 1h
    allow_http: true
    allowed_hosts: ["HOST", "*.my.salesforce.com"]
  - id: ofresh
    name: OFresh
    unified_api: accounting
    auth_type: oauth2
    status: live
    check: *check
    oauth: *oauth
    intervals: {callable: INTERVAL, added: INTERVAL, invalid: INTERVAL}
    token_lifetime: LIFETIME
    refresh_window: WINDOW
    allow_http: true
    allowed_hosts: ["HOST"]
`

// benchCatalog parses the bench catalog for a provider at host.
func benchCatalog(host string, interval, lifetime, window time.Duration) (*catalog.Catalog, error) {
	y := strings.NewReplacer("HOST", host, "INTERVAL", interval.String(), "LIFETIME", lifetime.String(),
		"WINDOW", window.String()).Replace(catalogYAML)
	return catalog.Parse([]byte(y))
}

// provider is the integration API of every scenario: /check answers 200
// after latency; /token answers a refresh grant with a new 200-character
// access token. With a freshness tracker it records check lag and tokens
// that expired before their refresh.
type provider struct {
	srv      *httptest.Server
	host     string
	latency  atomic.Int64 // nanoseconds
	lifetime time.Duration
	fresh    atomic.Pointer[freshness]
	checks   atomic.Int64
	tokens   atomic.Int64
}

func newProvider(lifetime time.Duration) *provider {
	p := &provider{lifetime: lifetime}
	mux := http.NewServeMux()
	mux.HandleFunc("/check", p.check)
	mux.HandleFunc("/token", p.token)
	p.srv = httptest.NewServer(mux)
	p.host = strings.TrimPrefix(p.srv.URL, "http://")
	return p
}

func (p *provider) Close() { p.srv.Close() }

func (p *provider) check(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	p.checks.Add(1)
	if d := time.Duration(p.latency.Load()); d > 0 {
		time.Sleep(d)
	}
	if f := p.fresh.Load(); f != nil {
		if i, ok := tokenIndex(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")); ok {
			f.checked(i, now)
		}
	}
	w.WriteHeader(http.StatusOK)
}

func (p *provider) token(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	p.tokens.Add(1)
	if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "refresh_token" {
		http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
		return
	}
	rt := r.PostForm.Get("refresh_token")
	i, ok := tokenIndex(rt)
	if !ok {
		http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
		return
	}
	gen := 0
	if f := p.fresh.Load(); f != nil {
		gen = f.refreshed(i, now, now.Add(p.lifetime))
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"access_token":  accessToken(i, gen),
		"token_type":    "Bearer",
		"expires_in":    int(p.lifetime.Seconds()),
		"refresh_token": rt,
	})
}

// accessToken is the 200-character access token of connection i,
// generation gen; refreshToken the 100-character refresh token. Both carry
// i so that the provider knows the connection.
func accessToken(i, gen int) string { return padToken(fmt.Sprintf("at.%d.%d.", i, gen), 200) }
func refreshToken(i int) string     { return padToken(fmt.Sprintf("rt.%d.", i), 100) }

func padToken(head string, n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	b := []byte(head)
	rng := rand.New(rand.NewPCG(uint64(len(head)), uint64(n)))
	for len(b) < n {
		b = append(b, alphabet[rng.IntN(len(alphabet))])
	}
	return string(b)
}

func tokenIndex(tok string) (int, bool) {
	parts := strings.SplitN(tok, ".", 3)
	if len(parts) < 3 || (parts[0] != "at" && parts[0] != "rt") {
		return 0, false
	}
	i, err := strconv.Atoi(parts[1])
	return i, err == nil
}

// consumerID names the i-th consumer of a population.
func consumerID(pop string, i int) string { return pop + "-" + strconv.Itoa(i) }

// newStore opens a store under its own key prefix.
func newStore(rdb redis.UniversalClient, cat *catalog.Catalog, prefix string, now func() time.Time) (*state.Store, error) {
	keys, err := benchKeys()
	if err != nil {
		return nil, err
	}
	return state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys, Prefix: prefix,
		EventStream: prefix + ":events", NowFunc: now})
}

// benchKeys is the keyring of every store of a run: one random key, so that
// stores opened on the same records read each other's credentials.
var benchKeys = sync.OnceValues(func() (*secrets.Keyring, error) { return secrets.ParseKeyring(secrets.NewKey("k1")) })

// forEach runs f(i) for i in [0, n) from par goroutines, stopping at the
// first error.
func forEach(ctx context.Context, n, par int, f func(i int) error) error {
	var next atomic.Int64
	g, ctx := errgroup.WithContext(ctx)
	for range par {
		g.Go(func() error {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return ctx.Err()
				}
				if err := f(i); err != nil {
					return err
				}
			}
		})
	}
	return g.Wait()
}

// seedKeys stores n callable-to-be API-key connections (state added).
func seedKeys(ctx context.Context, st *state.Store, pop string, n int) error {
	return forEach(ctx, n, 16, func(i int) error {
		ref := state.Ref{ConsumerID: consumerID(pop, i), ConnectionID: keyConn}
		_, err := st.Put(ctx, ref, state.Input{Credentials: map[string]string{"api_key": padToken("k.", 40)}}, 0)
		return err
	})
}

// seedOAuth stores n OAuth connections (200-character access token,
// 100-character refresh token, expiry, instance_url) of connID, each
// marked valid (callable). expires gives connection i's token expiry.
func seedOAuth(ctx context.Context, st *state.Store, pop, connID string, n int, settings bool, expires func(i int) time.Time) error {
	return forEach(ctx, n, 16, func(i int) error {
		ref := state.Ref{ConsumerID: consumerID(pop, i), ConnectionID: connID}
		in := state.Input{Credentials: map[string]string{
			"access_token":  accessToken(i, 0),
			"refresh_token": refreshToken(i),
			"expires_at":    expires(i).UTC().Format(time.RFC3339),
		}}
		if settings {
			in.Settings = map[string]string{"instance_url": fmt.Sprintf("https://acme-%d.my.salesforce.com", i)}
		}
		ch, err := st.Put(ctx, ref, in, 0)
		if err != nil {
			return fmt.Errorf("put %s: %w", ref, err)
		}
		if _, err := st.ApplyVerdict(ctx, ref, ch.After.Revision, state.Verdict{Outcome: state.OutcomeValid,
			Reason: state.ReasonCheckPassed, HTTPStatus: 200}); err != nil {
			return fmt.Errorf("verdict %s: %w", ref, err)
		}
		return nil
	})
}

// deletePrefix unlinks every key that starts with prefix (a population's
// store keys), for runs on a Redis the bench did not start.
func deletePrefix(ctx context.Context, rdb redis.UniversalClient, prefix string) error {
	iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	batch := make([]string, 0, 1000)
	for iter.Next(ctx) {
		batch = append(batch, iter.Val())
		if len(batch) == cap(batch) {
			if err := rdb.Unlink(ctx, batch...).Err(); err != nil {
				return err
			}
			batch = batch[:0]
		}
	}
	if err := iter.Err(); err != nil {
		return err
	}
	if len(batch) > 0 {
		return rdb.Unlink(ctx, batch...).Err()
	}
	return nil
}

// settle returns memory to the OS before a memory figure is taken.
func settle() {
	runtime.GC()
	runtime.GC()
}
