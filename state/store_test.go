package state

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// storeCatalogYAML is the catalog of the store tests, kept here so that
// edits of the default catalog do not move them.
const storeCatalogYAML = `
integrations:
  - id: salesforce
    name: Salesforce
    unified_api: crm
    auth_type: oauth2
    status: live
    settings:
      - name: instance_url
        type: url
        required: true
      - name: label
    check:
      url: "{instance_url}/services/oauth2/userinfo"
    oauth:
      token_url: https://login.salesforce.com/services/oauth2/token
      client_id_env: SF_ID
      client_secret_env: SF_SECRET
    token_lifetime: 2h
    allowed_hosts: ["*.my.salesforce.com", login.salesforce.com]
  - id: hubspot
    name: HubSpot
    unified_api: crm
    auth_type: oauth2
    status: live
    check:
      url: https://api.hubapi.com/account-info/v3/details
    oauth:
      token_url: https://api.hubapi.com/oauth/v1/token
      client_id_env: HS_ID
      client_secret_env: HS_SECRET
      scopes: [oauth, crm.read]
      required_scopes: [crm.read]
    allowed_hosts: [api.hubapi.com]
  - id: xero
    name: Xero
    unified_api: accounting
    auth_type: oauth2
    status: live
    settings:
      - name: tenant_id
        required: true
        affects_check: true
    check:
      url: https://api.xero.com/connections
    oauth:
      token_url: https://identity.xero.com/connect/token
      client_id_env: XERO_ID
      client_secret_env: XERO_SECRET
    refresh_window: 5m
    confirm_invalid: 1
    confirm_spacing: 2m
    allowed_hosts: [api.xero.com, identity.xero.com]
  - id: bamboohr
    name: BambooHR
    unified_api: hris
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    settings:
      - name: subdomain
        required: true
    check:
      url: https://api.bamboohr.com/api/gateway.php/{subdomain}/v1/meta/fields
      auth:
        scheme: basic
        username: api_key
        password: literal:x
    allowed_hosts: [api.bamboohr.com]
  - id: zendesk
    name: Zendesk
    unified_api: ticketing
    auth_type: basic
    status: live
    credential_fields: [username, password]
    settings:
      - name: subdomain
        required: true
    check:
      url: https://{subdomain}.zendesk.com/api/v2/users/me.json
    allowed_hosts: ["*.zendesk.com"]
  - id: freshdesk
    name: Freshdesk
    unified_api: ticketing
    auth_type: api_key
    status: development
    credential_fields: [api_key]
    check:
      url: https://api.freshdesk.com/api/v2/agents/me
    allowed_hosts: [api.freshdesk.com]
`

var (
	storeCatalogOnce sync.Once
	storeCatalogVal  *catalog.Catalog
	storeCatalogErr  error
)

func storeCatalog(tb testing.TB) *catalog.Catalog {
	tb.Helper()
	storeCatalogOnce.Do(func() { storeCatalogVal, storeCatalogErr = catalog.Parse([]byte(storeCatalogYAML)) })
	require.NoError(tb, storeCatalogErr)
	return storeCatalogVal
}

// storeT0 is the test clock's start, on a whole second (the store keeps
// milliseconds).
var storeT0 = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)

type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

type storeBundle struct {
	store *Store
	rdb   *redis.Client
	clock *testClock
	keys  *secrets.Keyring
	// keySpec is the keyring's spec, for rotation tests.
	keySpec string
	cfg     Config
}

func setupStore(tb testing.TB, mods ...func(*Config)) *storeBundle {
	tb.Helper()
	rdb := redistest.Start(tb).Client(tb)
	spec := secrets.NewKey("k1")
	keys, err := secrets.ParseKeyring(spec)
	require.NoError(tb, err)
	clock := &testClock{now: storeT0}
	cfg := Config{Client: rdb, Catalog: storeCatalog(tb), Keys: keys, NowFunc: clock.Now}
	for _, m := range mods {
		m(&cfg)
	}
	if c, ok := cfg.Client.(*redis.Client); ok {
		rdb = c // a mod's own server
	}
	s, err := New(cfg)
	require.NoError(tb, err)
	return &storeBundle{store: s, rdb: rdb, clock: clock, keys: keys, keySpec: spec, cfg: cfg}
}

var (
	refSF      = Ref{ConsumerID: "c1", ConnectionID: "crm+salesforce"}
	refHubSpot = Ref{ConsumerID: "c1", ConnectionID: "crm+hubspot"}
	refXero    = Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	refBamboo  = Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"}
	refZendesk = Ref{ConsumerID: "c1", ConnectionID: "ticketing+zendesk"}
)

func sfInput(at, rt string, expires time.Time) Input {
	return Input{
		Credentials: map[string]string{"access_token": at, "refresh_token": rt,
			"expires_at": expires.UTC().Format(time.RFC3339)},
		Settings: map[string]string{"instance_url": "https://acme.my.salesforce.com"},
	}
}

func bambooInput(key string) Input {
	return Input{Credentials: map[string]string{"api_key": key}, Settings: map[string]string{"subdomain": "acme"}}
}

func ptr[T any](v T) *T { return &v }

func eventTypes(evs []Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Type
	}
	return out
}

func TestNewConfig(t *testing.T) {
	t.Parallel()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer rdb.Close()
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	cat := storeCatalog(t)
	ok := Config{Client: rdb, Catalog: cat, Keys: keys}

	tests := map[string]struct {
		mod     func(*Config)
		wantErr string
	}{
		"Defaults":     {mod: func(*Config) {}},
		"NoClient":     {mod: func(c *Config) { c.Client = nil }, wantErr: "Client"},
		"NoCatalog":    {mod: func(c *Config) { c.Catalog = nil }, wantErr: "Catalog"},
		"NoKeys":       {mod: func(c *Config) { c.Keys = nil }, wantErr: "Keys"},
		"TooManyShard": {mod: func(c *Config) { c.Shards = 1025 }, wantErr: "Shards"},
		"NegShards":    {mod: func(c *Config) { c.Shards = -1 }, wantErr: "Shards"},
		"MaxShards":    {mod: func(c *Config) { c.Shards = 1024 }},
		"BracePrefix":  {mod: func(c *Config) { c.Prefix = "a{b}" }, wantErr: "Prefix"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			cfg := ok
			tt.mod(&cfg)
			s, err := New(cfg)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Positive(t, s.Shards())
		})
	}
	s, err := New(ok)
	require.NoError(t, err)
	require.Equal(t, DefaultShards, s.Shards())
	require.Equal(t, "vf:{s07}:counts", s.shardKeys(7).counts())
	s, err = New(Config{Client: rdb, Catalog: cat, Keys: keys, Shards: 1000})
	require.NoError(t, err)
	require.Equal(t, "vf:{s007}:counts", s.shardKeys(7).counts())
}

func TestPutGetRoundTrip(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	exp := storeT0.Add(time.Hour)

	tests := []struct {
		desc       string
		ref        Ref
		in         Input
		wantState  State
		wantHealth Health
		wantCreds  Credentials
	}{
		{desc: "OAuth", ref: refSF, in: sfInput("at-1", "rt-1", exp), wantState: Callable, wantHealth: HealthOK,
			wantCreds: Credentials{AccessToken: "at-1", RefreshToken: "rt-1", ExpiresAt: exp, IssuedAt: storeT0}},
		{desc: "OAuthNoTokens", ref: refHubSpot, in: Input{}, wantState: Added, wantHealth: HealthNeedsAuth},
		{desc: "OAuthMissingTenant", ref: refXero,
			in:        Input{Credentials: map[string]string{"access_token": "x-at", "refresh_token": "x-rt"}},
			wantState: Authorized, wantHealth: HealthMissingSettings,
			// No expiry given: the catalog's token lifetime (default 2h).
			wantCreds: Credentials{AccessToken: "x-at", RefreshToken: "x-rt", IssuedAt: storeT0, ExpiresAt: storeT0.Add(2 * time.Hour)}},
		{desc: "APIKey", ref: refBamboo, in: bambooInput("key-1"), wantState: Added, wantHealth: HealthOK,
			wantCreds: Credentials{APIKey: "key-1"}},
		{desc: "Basic", ref: refZendesk, in: Input{
			Credentials: map[string]string{"username": "a@acme.com/token", "password": "pw"},
			Settings:    map[string]string{"subdomain": "acme"}}, wantState: Added, wantHealth: HealthOK,
			wantCreds: Credentials{Username: "a@acme.com/token", Password: "pw"}},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			ch, err := b.store.Put(ctx, tt.ref, tt.in, 0)
			require.NoError(t, err)
			require.Nil(t, ch.Before)
			require.Equal(t, []string{EventCreated}, eventTypes(ch.Events))
			got, err := b.store.Get(ctx, tt.ref)
			require.NoError(t, err)
			require.Equal(t, ch.After, got)
			require.Equal(t, tt.wantState, got.State)
			require.Equal(t, tt.wantHealth, got.Health)
			require.Equal(t, tt.wantCreds, got.Credentials)
			require.True(t, got.Enabled)
			require.Equal(t, storeT0, got.CreatedAt)
			require.Equal(t, storeT0.UnixMilli(), got.Version)
			require.Equal(t, got.Version, got.Revision)
			api, svc, _ := SplitConnectionID(tt.ref.ConnectionID)
			require.Equal(t, api, got.UnifiedAPI)
			require.Equal(t, svc, got.ServiceID)
			require.Equal(t, tt.ref, got.Ref())
		})
	}

	_, err := b.store.Get(ctx, Ref{ConsumerID: "c1", ConnectionID: "crm+pipedrive"})
	require.ErrorIs(t, err, ErrNotFound)

	list, err := b.store.ListConsumer(ctx, "c1")
	require.NoError(t, err)
	var ids []string
	for _, c := range list {
		ids = append(ids, c.ID)
	}
	require.Equal(t, []string{"accounting+xero", "crm+hubspot", "crm+salesforce", "hris+bamboohr", "ticketing+zendesk"}, ids)
	list, err = b.store.ListConsumer(ctx, "c")
	require.NoError(t, err)
	require.Empty(t, list)
	_, err = b.store.ListConsumer(ctx, "bad|id")
	var fe *FieldError
	require.ErrorAs(t, err, &fe)
}

func TestPutValidation(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	var fe *FieldError

	tests := []struct {
		desc  string
		ref   Ref
		in    Input
		check func(t *testing.T, err error)
	}{
		{desc: "UnknownIntegration", ref: Ref{ConsumerID: "c1", ConnectionID: "crm+nosuch"},
			check: func(t *testing.T, err error) { require.ErrorIs(t, err, catalog.ErrUnknownIntegration) }},
		{desc: "WrongUnifiedAPI", ref: Ref{ConsumerID: "c1", ConnectionID: "hris+salesforce"},
			check: func(t *testing.T, err error) { require.ErrorIs(t, err, catalog.ErrUnknownIntegration) }},
		{desc: "DisallowedHost", ref: refSF,
			in:    Input{Settings: map[string]string{"instance_url": "https://169.254.169.254"}},
			check: func(t *testing.T, err error) { require.ErrorIs(t, err, catalog.ErrHostNotAllowed) }},
		{desc: "DisallowedHostName", ref: refSF,
			in:    Input{Settings: map[string]string{"instance_url": "https://evil.example.com"}},
			check: func(t *testing.T, err error) { require.ErrorIs(t, err, catalog.ErrHostNotAllowed) }},
		{desc: "BadConsumer", ref: Ref{ConsumerID: "a|b", ConnectionID: "crm+salesforce"},
			check: func(t *testing.T, err error) {
				require.ErrorAs(t, err, &fe)
				require.Equal(t, "consumer_id", fe.Field)
			}},
		{desc: "BadConnection", ref: Ref{ConsumerID: "c1", ConnectionID: "salesforce"},
			check: func(t *testing.T, err error) {
				require.ErrorAs(t, err, &fe)
				require.Equal(t, "connection_id", fe.Field)
			}},
		{desc: "UnknownCredentialField", ref: refBamboo,
			in: Input{Credentials: map[string]string{"password": "secret-pw"}},
			check: func(t *testing.T, err error) {
				require.ErrorAs(t, err, &fe)
				require.Equal(t, "credentials.password", fe.Field)
				require.NotContains(t, err.Error(), "secret-pw")
			}},
		{desc: "MalformedExpiry", ref: refSF,
			in: Input{Credentials: map[string]string{"expires_at": "tomorrow"}},
			check: func(t *testing.T, err error) {
				require.ErrorAs(t, err, &fe)
				require.Equal(t, "credentials.expires_at", fe.Field)
			}},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			_, err := b.store.Put(ctx, tt.ref, tt.in, 0)
			require.Error(t, err)
			tt.check(t, err)
			n, err := b.rdb.DBSize(ctx).Result()
			require.NoError(t, err)
			require.Zero(t, n, "nothing written")
		})
	}

	// A disallowed host in a Patch of an existing connection writes nothing.
	ch, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	_, err = b.store.Patch(ctx, refSF, Input{Settings: map[string]string{"instance_url": "http://127.0.0.1"}}, 0)
	require.ErrorIs(t, err, catalog.ErrHostNotAllowed)
	got, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, ch.After, got)

	_, err = b.store.Create(ctx, refSF, Input{})
	require.ErrorIs(t, err, ErrExists)
}

func TestPatchMerges(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()

	_, err := b.store.Patch(ctx, refZendesk, Input{}, 0)
	require.ErrorIs(t, err, ErrNotFound)

	_, err = b.store.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "u", "password": "p1"},
		Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)

	ch, err := b.store.Patch(ctx, refZendesk, Input{Credentials: map[string]string{"password": "p2"}}, 0)
	require.NoError(t, err)
	require.Equal(t, Credentials{Username: "u", Password: "p2"}, ch.After.Credentials)
	require.Equal(t, map[string]string{"subdomain": "acme"}, ch.After.Settings)

	// An empty value clears.
	ch, err = b.store.Patch(ctx, refZendesk, Input{Settings: map[string]string{"subdomain": ""}}, 0)
	require.NoError(t, err)
	require.Nil(t, ch.After.Settings)
	require.Equal(t, Added, ch.After.State)
	require.Equal(t, HealthMissingSettings, ch.After.Health)

	// Put replaces the whole set.
	ch, err = b.store.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "v"}}, 0)
	require.NoError(t, err)
	require.Equal(t, Credentials{Username: "v"}, ch.After.Credentials)
	require.Equal(t, HealthNeedsAuth, ch.After.Health)

	got, err := b.store.Get(ctx, refZendesk)
	require.NoError(t, err)
	require.Equal(t, ch.After, got)

	// Disable and enable.
	ch, err = b.store.SetEnabled(ctx, refZendesk, false, 0)
	require.NoError(t, err)
	require.False(t, ch.After.Enabled)
	require.Equal(t, []string{EventDisabled}, eventTypes(ch.Events))
	ch, err = b.store.Patch(ctx, refZendesk, Input{Enabled: ptr(true)}, 0)
	require.NoError(t, err)
	require.True(t, ch.After.Enabled)
	require.Equal(t, []string{EventUpdated}, eventTypes(ch.Events))
	require.Equal(t, EventReasonEnabled, ch.Events[0].Reason)

	// A write that changes nothing writes nothing.
	ch2, err := b.store.Patch(ctx, refZendesk, Input{Enabled: ptr(true)}, 0)
	require.NoError(t, err)
	require.Equal(t, ch.After.Version, ch2.After.Version)
	require.Empty(t, ch2.Events)
}

// dumpDB reads every key of the database and returns, per key, its name
// and every string it holds (string values, hash fields and values, zset
// members, stream field names and values).
func dumpDB(t testing.TB, rdb *redis.Client) map[string][]string {
	t.Helper()
	ctx := context.Background()
	out := map[string][]string{}
	iter := rdb.Scan(ctx, 0, "*", 100).Iterator()
	for iter.Next(ctx) {
		key := iter.Val()
		typ, err := rdb.Type(ctx, key).Result()
		require.NoError(t, err)
		vals := []string{key}
		switch typ {
		case "string":
			v, err := rdb.Get(ctx, key).Result()
			require.NoError(t, err)
			vals = append(vals, v)
		case "hash":
			m, err := rdb.HGetAll(ctx, key).Result()
			require.NoError(t, err)
			for k, v := range m {
				vals = append(vals, k, v)
			}
		case "zset":
			z, err := rdb.ZRange(ctx, key, 0, -1).Result()
			require.NoError(t, err)
			vals = append(vals, z...)
		case "stream":
			msgs, err := rdb.XRange(ctx, key, "-", "+").Result()
			require.NoError(t, err)
			for _, m := range msgs {
				for k, v := range m.Values {
					vals = append(vals, k, fmt.Sprint(v))
				}
			}
		default:
			t.Fatalf("unexpected key type %s of %s", typ, key)
		}
		out[key] = vals
	}
	require.NoError(t, iter.Err())
	return out
}

func TestDeleteRemovesEverything(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()

	_, err := b.store.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	other := Ref{ConsumerID: "c2", ConnectionID: "crm+salesforce"}
	_, err = b.store.Put(ctx, other, sfInput("at2", "rt2", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)

	for _, ref := range []Ref{refSF, refBamboo} {
		cur, err := b.store.Get(ctx, ref)
		require.NoError(t, err)
		_, err = b.store.Delete(ctx, ref, cur.Version+1)
		require.ErrorIs(t, err, ErrVersionConflict)
		ch, err := b.store.Delete(ctx, ref, cur.Version)
		require.NoError(t, err)
		require.Nil(t, ch.After)
		require.Equal(t, []string{EventDeleted}, eventTypes(ch.Events))
		_, err = b.store.Get(ctx, ref)
		require.ErrorIs(t, err, ErrNotFound)
		_, err = b.store.Delete(ctx, ref, 0)
		require.ErrorIs(t, err, ErrNotFound)
	}

	for key, vals := range dumpDB(t, b.rdb) {
		if key == b.store.cfg.EventStream {
			continue // the history of events stays
		}
		for _, v := range vals {
			require.NotContains(t, v, refSF.String(), key)
			require.NotContains(t, v, refBamboo.String(), key)
		}
	}
	counts, err := b.store.Counts(ctx)
	require.NoError(t, err)
	require.Equal(t, map[CountKey]int64{{ServiceID: "salesforce", State: Callable}: 1}, counts)
	list, err := b.store.ListConsumer(ctx, "c1")
	require.NoError(t, err)
	require.Empty(t, list)

	_, err = b.store.Delete(ctx, other, 0)
	require.NoError(t, err)
	counts, err = b.store.Counts(ctx)
	require.NoError(t, err)
	require.Empty(t, counts)
	keys, err := b.rdb.Keys(ctx, "vf:*").Result()
	require.NoError(t, err)
	require.Empty(t, keys, "no record, index or count left")
}

func TestRevisionAndVersion(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	exp := storeT0.Add(time.Hour)

	ch, err := b.store.Put(ctx, refSF, sfInput("at-1", "rt-1", exp), 0)
	require.NoError(t, err)
	rev, ver := ch.After.Revision, ch.After.Version

	step := func(desc string, wantRevBump bool, write func() (Change, error)) {
		t.Helper()
		ch, err := write()
		require.NoError(t, err, desc)
		if wantRevBump {
			rev++
		}
		ver++
		require.Equal(t, rev, ch.After.Revision, desc)
		require.Equal(t, ver, ch.After.Version, desc)
	}
	step("NewAccessToken", true, func() (Change, error) {
		return b.store.Patch(ctx, refSF, Input{Credentials: map[string]string{"access_token": "at-2"}}, 0)
	})
	step("CheckSetting", true, func() (Change, error) {
		return b.store.Patch(ctx, refSF, Input{Settings: map[string]string{"instance_url": "https://beta.my.salesforce.com"}}, 0)
	})
	step("OtherSetting", false, func() (Change, error) {
		return b.store.Patch(ctx, refSF, Input{Settings: map[string]string{"label": "Main org"}}, 0)
	})
	step("StoreTokens", false, func() (Change, error) {
		return b.store.StoreTokens(ctx, refSF, "rt-1", Tokens{AccessToken: "at-3", RefreshToken: "rt-2", ExpiresAt: exp.Add(time.Hour)})
	})
	step("Disable", false, func() (Change, error) { return b.store.SetEnabled(ctx, refSF, false, 0) })
	step("Verdict", false, func() (Change, error) {
		return b.store.ApplyVerdict(ctx, refSF, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	})

	// ifVersion
	_, err = b.store.Put(ctx, refSF, Input{Enabled: ptr(true)}, ver-1)
	require.ErrorIs(t, err, ErrVersionConflict)
	_, err = b.store.Patch(ctx, refSF, Input{Enabled: ptr(true)}, ver+1)
	require.ErrorIs(t, err, ErrVersionConflict)
	_, err = b.store.Put(ctx, refHubSpot, Input{}, 5)
	require.ErrorIs(t, err, ErrVersionConflict)
	step("IfVersionMatches", false, func() (Change, error) { return b.store.Patch(ctx, refSF, Input{Enabled: ptr(true)}, ver) })

	// A connection added again after a delete repeats no version or
	// revision of its predecessor.
	_, err = b.store.Delete(ctx, refSF, 0)
	require.NoError(t, err)
	b.clock.Advance(time.Second)
	ch, err = b.store.Put(ctx, refSF, sfInput("at-9", "rt-9", exp), 0)
	require.NoError(t, err)
	require.Greater(t, ch.After.Revision, rev)
	require.Greater(t, ch.After.Version, ver)
	_, err = b.store.ApplyVerdict(ctx, refSF, rev, Verdict{Outcome: OutcomeInvalid})
	require.ErrorIs(t, err, ErrStale)
}

func TestApplyVerdictStale(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()

	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k1"), 0)
	require.NoError(t, err)
	oldRev := ch.After.Revision
	ch, err = b.store.Patch(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": "k2"}}, 0)
	require.NoError(t, err)
	before, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)

	for _, o := range []Outcome{OutcomeValid, OutcomeInvalid} {
		_, err = b.store.ApplyVerdict(ctx, refBamboo, oldRev, Verdict{Outcome: o, Reason: "x"})
		require.ErrorIs(t, err, ErrStale)
	}
	_, err = b.store.RecordTransient(ctx, refBamboo, oldRev, "timeout")
	require.ErrorIs(t, err, ErrStale)
	after, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, before, after, "a stale verdict changes nothing")

	_, err = b.store.ApplyVerdict(ctx, Ref{ConsumerID: "c9", ConnectionID: "hris+bamboohr"}, 1, Verdict{Outcome: OutcomeValid})
	require.ErrorIs(t, err, ErrNotFound)
	_, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: "maybe"})
	var fe *FieldError
	require.ErrorAs(t, err, &fe)

	ch, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
}

// TestStaleVerdictRace races credential changes against verdicts computed
// for the revision each verdict writer read: no verdict lands on another
// revision than the one it was computed for.
func TestStaleVerdictRace(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()

	_, err := b.store.Put(ctx, refBamboo, bambooInput("key-0"), 0)
	require.NoError(t, err)

	const changes, verdictWriters, verdictsEach = 40, 4, 40
	var applied, stale atomic.Int64
	var g errgroup.Group
	g.Go(func() error {
		for i := 1; i <= changes; i++ {
			if _, err := b.store.Patch(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": fmt.Sprint("key-", i)}}, 0); err != nil {
				return err
			}
		}
		return nil
	})
	for w := range verdictWriters {
		g.Go(func() error {
			for i := range verdictsEach {
				c, err := b.store.Get(ctx, refBamboo)
				if err != nil {
					return err
				}
				o := OutcomeValid
				if (w+i)%3 == 0 {
					o = OutcomeInvalid
				}
				ch, err := b.store.ApplyVerdict(ctx, refBamboo, c.Revision, Verdict{Outcome: o, Reason: "r"})
				switch {
				case errors.Is(err, ErrStale):
					stale.Add(1)
				case err != nil:
					return err
				default:
					applied.Add(1)
					// Applied atomically at the revision it was computed for.
					if ch.Before.Revision != c.Revision || ch.After.Revision != c.Revision ||
						ch.After.Verdict.Revision != c.Revision {
						return fmt.Errorf("verdict for revision %d applied at revision %d", c.Revision, ch.Before.Revision)
					}
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	t.Logf("applied %d verdicts, dropped %d stale ones", applied.Load(), stale.Load())
	require.Positive(t, applied.Load())

	c, err := b.store.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, "key-40", c.Credentials.APIKey)
	if c.Verdict != nil && c.Verdict.Revision != c.Revision {
		st, _ := Derive(c, mustIntegration(t, b.store, refBamboo), storeT0)
		require.Equal(t, Added, st, "an old verdict does not decide the state")
		require.Equal(t, Added, c.State)
	}
}

func mustIntegration(t testing.TB, s *Store, ref Ref) *catalog.Integration {
	t.Helper()
	in, err := s.integration(ref.ConnectionID)
	require.NoError(t, err)
	return in
}

func TestStoreTokens(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	exp := storeT0.Add(time.Hour)

	ch, err := b.store.Put(ctx, refSF, sfInput("at-1", "rt-1", exp), 0)
	require.NoError(t, err)
	due, ok, err := b.store.DueAt(ctx, IndexRefresh, refSF)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, exp.Add(-10*time.Minute), due, "1h lifetime: 10 minutes ahead")

	_, err = b.store.StoreTokens(ctx, refSF, "rt-0", Tokens{AccessToken: "at-2", ExpiresAt: exp})
	require.ErrorIs(t, err, ErrStale)
	_, err = b.store.StoreTokens(ctx, refSF, "rt-1", Tokens{ExpiresAt: exp})
	require.ErrorIs(t, err, ErrEmptyAccessToken)
	_, err = b.store.StoreTokens(ctx, Ref{ConsumerID: "zz", ConnectionID: "crm+salesforce"}, "rt-1", Tokens{AccessToken: "a"})
	require.ErrorIs(t, err, ErrNotFound)

	// Failures: one failed event per episode.
	for i := range 3 {
		ch, err := b.store.RecordRefreshFailure(ctx, refSF, "rt-1", "token endpoint answered 503")
		require.NoError(t, err)
		if i == 0 {
			require.Equal(t, []string{EventTokenRefreshFailed}, eventTypes(ch.Events))
			require.Equal(t, HealthPendingRefresh, ch.After.Health)
		} else {
			require.Empty(t, ch.Events)
		}
	}
	_, err = b.store.RecordRefreshFailure(ctx, refSF, "rt-0", "x")
	require.ErrorIs(t, err, ErrStale)

	b.clock.Advance(40 * time.Minute)
	now := b.clock.Now()
	newExp := now.Add(30 * time.Minute)
	ch2, err := b.store.StoreTokens(ctx, refSF, "rt-1", Tokens{AccessToken: "at-2", ExpiresAt: newExp})
	require.NoError(t, err)
	require.Equal(t, []string{EventTokenRefreshRecovered}, eventTypes(ch2.Events))
	got, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, Credentials{AccessToken: "at-2", RefreshToken: "rt-1", ExpiresAt: newExp, IssuedAt: now}, got.Credentials)
	require.Equal(t, ch.After.Revision, got.Revision, "a refresh is no new revision")
	require.Equal(t, RefreshStatus{RefreshedAt: now}, got.Refresh)
	require.Equal(t, HealthOK, got.Health)
	due, ok, err = b.store.DueAt(ctx, IndexRefresh, refSF)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, newExp.Add(-6*time.Minute), due, "30m lifetime: 20% ahead")

	// A rotated refresh token replaces the old one; the old one is stale.
	_, err = b.store.StoreTokens(ctx, refSF, "rt-1", Tokens{AccessToken: "at-3", RefreshToken: "rt-2", ExpiresAt: newExp})
	require.NoError(t, err)
	_, err = b.store.StoreTokens(ctx, refSF, "rt-1", Tokens{AccessToken: "at-4", ExpiresAt: newExp})
	require.ErrorIs(t, err, ErrStale)
	got, err = b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, "at-3", got.Credentials.AccessToken)
	require.Equal(t, "rt-2", got.Credentials.RefreshToken)

	// A token response without expires_in: the catalog's token lifetime.
	ch, err = b.store.StoreTokens(ctx, refSF, "rt-2", Tokens{AccessToken: "at-5"})
	require.NoError(t, err)
	require.Equal(t, now.Add(2*time.Hour), ch.After.Credentials.ExpiresAt)
	require.Equal(t, now, ch.After.Credentials.IssuedAt)
}

func TestCountsExact(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 4 })
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	conns := []string{"crm+salesforce", "crm+hubspot", "accounting+xero", "hris+bamboohr", "ticketing+zendesk", "ticketing+freshdesk"}

	recount := func() map[CountKey]int64 {
		want := map[CountKey]int64{}
		cursor := ""
		for {
			page, next, err := b.store.List(ctx, Filter{}, cursor, 7)
			require.NoError(t, err)
			for _, c := range page {
				want[CountKey{ServiceID: c.ServiceID, State: c.State}]++
			}
			if next == "" {
				return want
			}
			cursor = next
		}
	}
	for i := range 300 {
		ref := Ref{ConsumerID: fmt.Sprint("u", rng.IntN(8)), ConnectionID: conns[rng.IntN(len(conns))]}
		var err error
		switch op := rng.IntN(6); op {
		case 0:
			_, err = b.store.Put(ctx, ref, Input{}, 0)
		case 1:
			creds := map[string]string{}
			in := mustIntegration(t, b.store, ref)
			for _, f := range in.CredentialFields {
				creds[f] = fmt.Sprint("v", i)
			}
			if in.AuthType == catalog.AuthOAuth2 {
				creds["access_token"], creds["refresh_token"] = fmt.Sprint("a", i), "r"
			}
			_, err = b.store.Put(ctx, ref, Input{Credentials: creds}, 0)
		case 2, 3:
			c, gerr := b.store.Get(ctx, ref)
			if gerr != nil {
				err = gerr
				break
			}
			o := OutcomeValid
			if op == 3 {
				o = OutcomeInvalid
			}
			_, err = b.store.ApplyVerdict(ctx, ref, c.Revision, Verdict{Outcome: o})
		case 4:
			_, err = b.store.Delete(ctx, ref, 0)
		case 5:
			_, err = b.store.Patch(ctx, ref, Input{Enabled: ptr(rng.IntN(2) == 0)}, 0)
		}
		if err != nil && !errors.Is(err, ErrNotFound) {
			require.NoError(t, err)
		}
		if i%100 == 99 {
			got, err := b.store.Counts(ctx)
			require.NoError(t, err)
			require.Equal(t, recount(), got, "after %d writes", i+1)
		}
	}
}

func TestConfirmation(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	in := Input{Credentials: map[string]string{"access_token": "at", "refresh_token": "rt",
		"expires_at": storeT0.Add(30 * time.Minute).Format(time.RFC3339)},
		Settings: map[string]string{"tenant_id": "t-1"}}
	ch, err := b.store.Put(ctx, refXero, in, 0)
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	rev := ch.After.Revision

	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Empty(t, ch.Events, "callable already")

	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	require.Equal(t, HealthPendingConfirmation, ch.After.Health)
	require.Equal(t, OutcomeValid, ch.After.Verdict.Outcome, "the verdict is held")
	require.Equal(t, Confirmation{Invalids: 1, Revision: rev, Reason: ReasonCredentialsRejected, Status: 401, FirstAt: storeT0},
		ch.After.Confirmation)
	require.Equal(t, []string{EventUpdated}, eventTypes(ch.Events))
	due, ok, err := b.store.DueAt(ctx, IndexCheck, refXero)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, storeT0.Add(2*time.Minute+confirmGrace), due,
		"the confirming task checks after confirm_spacing; the index only catches a lost one")

	b.clock.Advance(2 * time.Minute)
	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthNeedsAuth, ch.After.Health)
	require.Equal(t, Confirmation{}, ch.After.Confirmation)
	require.Equal(t, []string{EventInvalid}, eventTypes(ch.Events))
	require.Equal(t, ReasonCredentialsRejected, ch.Events[0].Reason)

	// A valid result in between resets the count.
	ch, err = b.store.Patch(ctx, refXero, Input{Credentials: map[string]string{"access_token": "at-2"}}, 0)
	require.NoError(t, err)
	rev = ch.After.Revision
	require.Equal(t, Callable, ch.After.State)
	_, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonRefreshTokenRevoked})
	require.NoError(t, err)
	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeValid})
	require.NoError(t, err)
	require.Equal(t, HealthOK, ch.After.Health)
	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonRefreshTokenRevoked})
	require.NoError(t, err)
	require.Equal(t, Callable, ch.After.State)
	ch, err = b.store.ApplyVerdict(ctx, refXero, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonRefreshTokenRevoked})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthRevoked, ch.After.Health)
	require.Equal(t, []string{EventRevoked}, eventTypes(ch.Events))
	_, ok, err = b.store.DueAt(ctx, IndexRefresh, refXero)
	require.NoError(t, err)
	require.False(t, ok, "a revoked refresh token is not refreshed")
}

func TestEvents(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.EventStream = "test:events" })
	ctx := context.Background()

	var want []string
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	want = append(want, EventCreated)
	rev := ch.After.Revision

	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Equal(t, []string{EventCallable}, eventTypes(ch.Events))
	e := ch.Events[0]
	require.NotEmpty(t, e.ID)
	require.Equal(t, Event{ID: e.ID, Type: EventCallable, ConnectionID: "hris+bamboohr", ConsumerID: "c1",
		ServiceID: "bamboohr", UnifiedAPI: "hris", StateBefore: Added, StateAfter: Callable,
		HealthBefore: HealthOK, HealthAfter: HealthOK, Reason: ReasonCheckPassed, Version: ch.After.Version,
		Time: storeT0}, e)
	want = append(want, EventCallable)

	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Empty(t, ch.Events, "a repeat valid verdict is no event")

	for i := range 5 {
		ch, err = b.store.RecordTransient(ctx, refBamboo, rev, fmt.Sprint("check answered 503 (", i, ")"))
		require.NoError(t, err)
		require.Equal(t, Callable, ch.After.State)
		require.Equal(t, HealthDegraded, ch.After.Health)
		require.Equal(t, i+1, ch.After.Transient.Failures)
		if i == 0 {
			require.Equal(t, []string{EventDownstreamDegraded}, eventTypes(ch.Events))
			require.Equal(t, "check answered 503 (0)", ch.Events[0].Reason)
		} else {
			require.Empty(t, ch.Events)
		}
	}
	want = append(want, EventDownstreamDegraded)
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	require.Equal(t, []string{EventDownstreamRecovered}, eventTypes(ch.Events))
	want = append(want, EventDownstreamRecovered)

	long := strings.Repeat("é", 300)
	ch, err = b.store.RecordTransient(ctx, refBamboo, rev, long)
	require.NoError(t, err)
	require.Equal(t, 200, len([]rune(ch.After.Transient.LastError)))
	want = append(want, EventDownstreamDegraded)

	ch, err = b.store.Patch(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": "k2"}}, 0)
	require.NoError(t, err)
	require.Equal(t, []string{EventUpdated}, eventTypes(ch.Events))
	require.Equal(t, EventReasonCredentialsChanged, ch.Events[0].Reason)
	want = append(want, EventUpdated)

	ch, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)
	require.Equal(t, []string{EventInvalid, EventDownstreamRecovered}, eventTypes(ch.Events))
	want = append(want, EventInvalid, EventDownstreamRecovered)

	ch, err = b.store.SetEnabled(ctx, refBamboo, false, 0)
	require.NoError(t, err)
	want = append(want, EventDisabled)
	_, err = b.store.Delete(ctx, refBamboo, 0)
	require.NoError(t, err)
	want = append(want, EventDeleted)

	evs, err := b.store.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	require.Equal(t, want, eventTypes(evs))
	require.Equal(t, ch.Events[0].ID, evs[len(evs)-2].ID)
	for _, e := range evs {
		require.Contains(t, EventTypes(), e.Type)
		require.Equal(t, "c1", e.ConsumerID)
		require.Equal(t, "bamboohr", e.ServiceID)
		require.Positive(t, e.Version)
	}
	page, err := b.store.ReadEvents(ctx, evs[2].ID, 2)
	require.NoError(t, err)
	require.Equal(t, evs[3:5], page)
}

func TestDueCheck(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	dueAt := func(ref Ref) (time.Time, bool) {
		t.Helper()
		at, ok, err := b.store.DueAt(ctx, IndexCheck, ref)
		require.NoError(t, err)
		return at, ok
	}

	// Created with credentials: the safety net.
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	at, ok := dueAt(refBamboo)
	require.True(t, ok)
	require.Equal(t, storeT0.Add(safetyNet), at)

	// A verdict that changes the state: the interval of the new state.
	b.clock.Advance(time.Minute)
	_, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid})
	require.NoError(t, err)
	at, ok = dueAt(refBamboo)
	require.True(t, ok)
	now := b.clock.Now()
	require.Equal(t, NextCheckAt(refBamboo, mustIntegration(t, b.store, refBamboo), Callable, now, DefaultJitter).UnixMilli(), at.UnixMilli(),
		"callable: 1h ± the connection's jitter, got %v", at.Sub(now))

	// An unrelated write leaves the score alone.
	_, err = b.store.RecordTransient(ctx, refBamboo, ch.After.Revision, "x")
	require.NoError(t, err)
	at2, _ := dueAt(refBamboo)
	require.Equal(t, at, at2)

	// Disabled: out; enabled again: the safety net.
	_, err = b.store.SetEnabled(ctx, refBamboo, false, 0)
	require.NoError(t, err)
	_, ok = dueAt(refBamboo)
	require.False(t, ok)
	_, err = b.store.SetEnabled(ctx, refBamboo, true, 0)
	require.NoError(t, err)
	at, ok = dueAt(refBamboo)
	require.True(t, ok)
	require.Equal(t, now.Add(safetyNet), at)

	// Never checked: no credentials, authorized, not a checked connector.
	_, err = b.store.Put(ctx, refHubSpot, Input{}, 0)
	require.NoError(t, err)
	_, err = b.store.Put(ctx, refXero, Input{Credentials: map[string]string{"access_token": "a"}}, 0)
	require.NoError(t, err)
	refFresh := Ref{ConsumerID: "c1", ConnectionID: "ticketing+freshdesk"}
	_, err = b.store.Put(ctx, refFresh, Input{Credentials: map[string]string{"api_key": "k"}}, 0)
	require.NoError(t, err)
	for _, ref := range []Ref{refHubSpot, refXero, refFresh} {
		_, ok = dueAt(ref)
		require.False(t, ok, ref)
		_, ok, err = b.store.DueAt(ctx, IndexRefresh, ref)
		require.NoError(t, err)
		require.False(t, ok, ref)
	}
	// The tenant set: checkable now, at once.
	_, err = b.store.Patch(ctx, refXero, Input{Settings: map[string]string{"tenant_id": "t"}}, 0)
	require.NoError(t, err)
	at, ok = dueAt(refXero)
	require.True(t, ok)
	require.Equal(t, now.Add(safetyNet), at)
}

func TestListFilters(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 3 })
	ctx := context.Background()
	for i := range 12 {
		consumer := fmt.Sprintf("f%02d", i)
		_, err := b.store.Put(ctx, Ref{ConsumerID: consumer, ConnectionID: "crm+hubspot"}, Input{}, 0)
		require.NoError(t, err)
		ch, err := b.store.Put(ctx, Ref{ConsumerID: consumer, ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0)
		require.NoError(t, err)
		if i%2 == 0 {
			_, err = b.store.ApplyVerdict(ctx, ch.After.Ref(), ch.After.Revision, Verdict{Outcome: OutcomeValid})
			require.NoError(t, err)
		}
	}
	all := func(f Filter, limit int) []*Connection {
		var out []*Connection
		cursor := ""
		for {
			page, next, err := b.store.List(ctx, f, cursor, limit)
			require.NoError(t, err)
			require.LessOrEqual(t, len(page), max(limit, 0)+DefaultListLimit)
			out = append(out, page...)
			if next == "" {
				return out
			}
			cursor = next
		}
	}
	tests := []struct {
		desc string
		f    Filter
		want int
		ok   func(*Connection) bool
	}{
		{desc: "All", want: 24, ok: func(*Connection) bool { return true }},
		{desc: "State", f: Filter{State: Callable}, want: 6, ok: func(c *Connection) bool { return c.State == Callable }},
		{desc: "Service", f: Filter{ServiceID: "hubspot"}, want: 12, ok: func(c *Connection) bool { return c.ServiceID == "hubspot" }},
		{desc: "ServiceState", f: Filter{ServiceID: "bamboohr", State: Added}, want: 6,
			ok: func(c *Connection) bool { return c.ServiceID == "bamboohr" && c.State == Added }},
		{desc: "UnifiedAPI", f: Filter{UnifiedAPI: "hris"}, want: 12, ok: func(c *Connection) bool { return c.UnifiedAPI == "hris" }},
		{desc: "None", f: Filter{UnifiedAPI: "accounting"}, want: 0},
	}
	for _, tt := range tests {
		for _, limit := range []int{1, 5, 0} {
			t.Run(fmt.Sprint(tt.desc, limit), func(t *testing.T) {
				got := all(tt.f, limit)
				require.Len(t, got, tt.want)
				seen := map[Ref]bool{}
				for _, c := range got {
					require.True(t, tt.ok(c))
					require.False(t, seen[c.Ref()])
					seen[c.Ref()] = true
				}
			})
		}
	}

	var fe *FieldError
	for _, bad := range []string{"!!", base64.RawURLEncoding.EncodeToString([]byte("1:99:a|crm+x")),
		base64.RawURLEncoding.EncodeToString([]byte("2:0:a|crm+x")), base64.RawURLEncoding.EncodeToString([]byte("1:0:nobar"))} {
		_, _, err := b.store.List(ctx, Filter{}, bad, 10)
		require.ErrorAs(t, err, &fe, bad)
		require.Equal(t, "cursor", fe.Field)
	}
	_, _, err := b.store.List(ctx, Filter{State: "sleeping"}, "", 10)
	require.ErrorAs(t, err, &fe)
	page, _, err := b.store.List(ctx, Filter{}, "", 10_000)
	require.NoError(t, err)
	require.Len(t, page, 24)
}

// TestListUnderConcurrentWrites walks 1,000 connections while another
// goroutine adds, deletes and updates other connections: each of the
// 1,000 is returned exactly once.
func TestListUnderConcurrentWrites(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 8 })
	ctx := context.Background()
	const n = 1000

	var seed errgroup.Group
	for w := range 4 {
		seed.Go(func() error {
			for i := w; i < n; i += 4 {
				if _, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("p%04d", i), ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0); err != nil {
					return err
				}
			}
			return nil
		})
	}
	require.NoError(t, seed.Wait())

	stop := make(chan struct{})
	var writes atomic.Int64
	var writer errgroup.Group
	writer.Go(func() error {
		rng := rand.New(rand.NewPCG(3, 4))
		for {
			select {
			case <-stop:
				return nil
			default:
			}
			// Consumers "o…" sort between and around the "p…" ones in
			// every shard; some share the p consumers' prefix.
			consumer := fmt.Sprintf("o%04d", rng.IntN(300))
			if rng.IntN(2) == 0 {
				consumer = fmt.Sprintf("p%04d-x", rng.IntN(n))
			}
			ref := Ref{ConsumerID: consumer, ConnectionID: "hris+bamboohr"}
			var err error
			switch rng.IntN(3) {
			case 0:
				_, err = b.store.Put(ctx, ref, bambooInput(fmt.Sprint(rng.IntN(5))), 0)
			case 1:
				_, err = b.store.Delete(ctx, ref, 0)
			case 2:
				var c *Connection
				if c, err = b.store.Get(ctx, ref); err == nil {
					_, err = b.store.ApplyVerdict(ctx, ref, c.Revision, Verdict{Outcome: OutcomeValid})
				}
			}
			if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrStale) {
				return err
			}
			writes.Add(1)
		}
	})
	defer func() {
		close(stop)
		require.NoError(t, writer.Wait())
	}()

	for _, f := range []Filter{{}, {State: Added}, {ServiceID: "bamboohr"}} {
		seen := map[string]int{}
		cursor, pages := "", 0
		for {
			page, next, err := b.store.List(ctx, f, cursor, 37)
			require.NoError(t, err)
			require.LessOrEqual(t, len(page), 37)
			pages++
			for _, c := range page {
				if strings.HasPrefix(c.ConsumerID, "p") && !strings.HasSuffix(c.ConsumerID, "-x") {
					seen[c.ConsumerID]++
				}
			}
			if next == "" {
				break
			}
			cursor = next
		}
		require.Len(t, seen, n, "filter %+v", f)
		for id, k := range seen {
			require.Equal(t, 1, k, id)
		}
		t.Logf("filter %+v: %d pages", f, pages)
	}
	t.Logf("%d concurrent writes during the walks", writes.Load())
}

// TestNoPlaintextSecret writes connections with known secrets and reads
// every key and value in Redis: no secret, nor its base64, appears.
func TestNoPlaintextSecret(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	suffix := fmt.Sprint(rand.Uint64())
	secretsIn := map[string]string{
		"access":   "ACCESS-" + suffix + strings.Repeat("a", 40),
		"refresh":  "REFRESH-" + suffix + strings.Repeat("r", 40),
		"refresh2": "ROTATED-" + suffix + strings.Repeat("q", 40),
		"access2":  "NEWACCESS-" + suffix + strings.Repeat("n", 40),
		"apikey":   "APIKEY-" + suffix + strings.Repeat("k", 30),
		"password": "PASSWORD-" + suffix + strings.Repeat("p", 20),
	}
	exp := storeT0.Add(time.Hour)
	_, err := b.store.Put(ctx, refSF, sfInput(secretsIn["access"], secretsIn["refresh"], exp), 0)
	require.NoError(t, err)
	_, err = b.store.StoreTokens(ctx, refSF, secretsIn["refresh"], Tokens{AccessToken: secretsIn["access2"],
		RefreshToken: secretsIn["refresh2"], ExpiresAt: exp})
	require.NoError(t, err)
	_, err = b.store.RecordRefreshFailure(ctx, refSF, secretsIn["refresh2"], "token endpoint answered 500")
	require.NoError(t, err)
	ch, err := b.store.Put(ctx, refBamboo, bambooInput(secretsIn["apikey"]), 0)
	require.NoError(t, err)
	_, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected})
	require.NoError(t, err)
	_, err = b.store.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "agent@acme.com/token",
		"password": secretsIn["password"]}, Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)

	dump := dumpDB(t, b.rdb)
	require.NotEmpty(t, dump)
	var all strings.Builder
	for _, vals := range dump {
		for _, v := range vals {
			all.WriteString(v)
			all.WriteByte(0)
		}
	}
	blob := all.String()
	for name, secret := range secretsIn {
		for _, enc := range []string{secret, base64.StdEncoding.EncodeToString([]byte(secret)),
			base64.RawURLEncoding.EncodeToString([]byte(secret)), secret[len(secret)-24:]} {
			require.NotContains(t, blob, enc, name)
		}
	}
	// The store still reads them back.
	got, err := b.store.Get(ctx, refSF)
	require.NoError(t, err)
	require.Equal(t, secretsIn["access2"], got.Credentials.AccessToken)
}

func TestKeyRotation(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	secret := "rotating-secret-" + fmt.Sprint(rand.Uint64())
	_, err := b.store.Put(ctx, refBamboo, bambooInput(secret), 0)
	require.NoError(t, err)

	spec2 := secrets.NewKey("k2")
	withKeys := func(spec string) *Store {
		keys, err := secrets.ParseKeyring(spec)
		require.NoError(t, err)
		cfg := b.cfg
		cfg.Keys = keys
		s, err := New(cfg)
		require.NoError(t, err)
		return s
	}
	// A new primary, the old key still listed: reads work, new writes seal
	// with the new key.
	s2 := withKeys(spec2 + "," + b.keySpec)
	got, err := s2.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, secret, got.Credentials.APIKey)
	_, err = s2.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "u", "password": secret}}, 0)
	require.NoError(t, err)
	raw, err := b.rdb.HGet(ctx, s2.keysOf(refZendesk).record(refZendesk.String()), fieldCreds).Result()
	require.NoError(t, err)
	id, err := secrets.KeyID([]byte(raw))
	require.NoError(t, err)
	require.Equal(t, "k2", id)

	// The old key removed: a clear error, no secret in it.
	s3 := withKeys(spec2)
	_, err = s3.Get(ctx, refBamboo)
	require.ErrorIs(t, err, ErrDecrypt)
	require.ErrorIs(t, err, secrets.ErrUnknownKey)
	require.Contains(t, err.Error(), `"k1"`)
	require.Contains(t, err.Error(), refBamboo.String())
	require.NotContains(t, err.Error(), secret)
	got, err = s3.Get(ctx, refZendesk)
	require.NoError(t, err)
	require.Equal(t, secret, got.Credentials.Password)

	// Reseal moves the old key's values to the primary key.
	resealed, err := s2.Reseal(ctx, refBamboo)
	require.NoError(t, err)
	require.True(t, resealed)
	resealed, err = s2.Reseal(ctx, refBamboo)
	require.NoError(t, err)
	require.False(t, resealed, "already under the primary key")
	got, err = s3.Get(ctx, refBamboo)
	require.NoError(t, err)
	require.Equal(t, secret, got.Credentials.APIKey)
	evs, err := b.store.ReadEvents(ctx, "", 0)
	require.NoError(t, err)
	require.Equal(t, []string{EventCreated, EventCreated}, eventTypes(evs), "a reseal is no event")

	// A sealed value copied to another record does not open.
	sealed, err := b.rdb.HGet(ctx, b.store.keysOf(refBamboo).record(refBamboo.String()), fieldCreds).Result()
	require.NoError(t, err)
	other := Ref{ConsumerID: "c1", ConnectionID: "ticketing+freshdesk"}
	_, err = b.store.Put(ctx, other, Input{Credentials: map[string]string{"api_key": "x"}}, 0)
	require.NoError(t, err)
	require.NoError(t, b.rdb.HSet(ctx, b.store.keysOf(other).record(other.String()), fieldCreds, sealed).Err())
	_, err = s2.Get(ctx, other)
	require.ErrorIs(t, err, secrets.ErrCorrupt)
	require.NotContains(t, err.Error(), secret)
}

func TestClaimDue(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 1 })
	ctx := context.Background()
	const n = 300
	for i := range n {
		_, err := b.store.Put(ctx, Ref{ConsumerID: fmt.Sprintf("d%03d", i), ConnectionID: "hris+bamboohr"}, bambooInput("k"), 0)
		require.NoError(t, err)
	}
	now := storeT0.Add(safetyNet)
	oldest, ok, err := b.store.OldestDue(ctx, IndexCheck, now)
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, now, oldest)
	_, ok, err = b.store.OldestDue(ctx, IndexCheck, now.Add(-time.Millisecond))
	require.NoError(t, err)
	require.False(t, ok)

	// Two claimers at once never take the same member.
	lease := time.Minute
	var mu sync.Mutex
	claimed := map[Ref]int{}
	var claimers errgroup.Group
	for range 2 {
		claimers.Go(func() error {
			for {
				cs, err := b.store.ClaimDue(ctx, IndexCheck, 0, now, lease, 7)
				if err != nil || len(cs) == 0 {
					return err
				}
				mu.Lock()
				for _, c := range cs {
					claimed[c.Ref]++
					if !c.Due.Equal(now) || !c.Lease.Equal(now.Add(lease)) || c.ServiceID != "bamboohr" || c.State != Added {
						err = fmt.Errorf("unexpected claim %+v", c)
					}
				}
				mu.Unlock()
				if err != nil {
					return err
				}
			}
		})
	}
	require.NoError(t, claimers.Wait())
	require.Len(t, claimed, n)
	for ref, k := range claimed {
		require.Equal(t, 1, k, ref)
	}
	_, ok, err = b.store.OldestDue(ctx, IndexCheck, now.Add(lease-time.Millisecond))
	require.NoError(t, err)
	require.False(t, ok, "leased members are not due")

	// The lease expires: due again.
	cs, err := b.store.ClaimDue(ctx, IndexCheck, 0, now.Add(lease), lease, 1000)
	require.NoError(t, err)
	require.Len(t, cs, n)

	// Reschedule moves a claim; a write since the claim wins over it.
	c0, c1 := cs[0], cs[1]
	next := now.Add(2 * time.Hour)
	applied, err := b.store.RescheduleClaim(ctx, IndexCheck, c0, next)
	require.NoError(t, err)
	require.True(t, applied)
	at, _, err := b.store.DueAt(ctx, IndexCheck, c0.Ref)
	require.NoError(t, err)
	require.Equal(t, next, at)

	b.clock.Advance(5 * time.Minute)
	_, err = b.store.Patch(ctx, c1.Ref, Input{Credentials: map[string]string{"api_key": "new"}}, 0)
	require.NoError(t, err)
	_, err = b.store.RescheduleClaim(ctx, IndexCheck, c1, next)
	require.NoError(t, err)
	at, _, err = b.store.DueAt(ctx, IndexCheck, c1.Ref)
	require.NoError(t, err)
	require.Equal(t, b.clock.Now().Add(safetyNet), at, "the write's due time stands")

	// A member whose record vanished is dropped, not claimed.
	require.NoError(t, b.rdb.ZAdd(ctx, b.store.shardKeys(0).due(IndexCheck), redis.Z{Score: 1, Member: "ghost|hris+bamboohr"}).Err())
	cs, err = b.store.ClaimDue(ctx, IndexCheck, 0, storeT0, lease, 10)
	require.NoError(t, err)
	require.Empty(t, cs)
	_, err = b.rdb.ZScore(ctx, b.store.shardKeys(0).due(IndexCheck), "ghost|hris+bamboohr").Result()
	require.ErrorIs(t, err, redis.Nil)

	_, err = b.store.ClaimDue(ctx, IndexCheck, 1, now, lease, 1)
	require.Error(t, err)
	_, err = b.store.ClaimDue(ctx, "soon", 0, now, lease, 1)
	require.Error(t, err)
}

func TestOldestDueAcrossShards(t *testing.T) {
	t.Parallel()
	b := setupStore(t, func(c *Config) { c.Shards = 5 })
	ctx := context.Background()
	exp := storeT0.Add(time.Hour)
	var wantOldest time.Time
	for i := range 10 {
		ref := Ref{ConsumerID: fmt.Sprint("r", i), ConnectionID: "crm+salesforce"}
		e := exp.Add(time.Duration(10-i) * time.Minute)
		_, err := b.store.Put(ctx, ref, sfInput("a", "r", e), 0)
		require.NoError(t, err)
		wantOldest = e.Add(-10 * time.Minute)
	}
	got, ok, err := b.store.OldestDue(ctx, IndexRefresh, exp.Add(24*time.Hour))
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, wantOldest, got)
	total := 0
	for sh := range b.store.Shards() {
		cs, err := b.store.ClaimDue(ctx, IndexRefresh, sh, exp.Add(24*time.Hour), time.Minute, 100)
		require.NoError(t, err)
		total += len(cs)
	}
	require.Equal(t, 10, total)
}

func TestRecordCodecRoundTrip(t *testing.T) {
	t.Parallel()
	at := storeT0.Add(1234 * time.Millisecond)
	tests := map[string]*Connection{
		"Empty": {Enabled: true, Revision: 7, Health: HealthNeedsAuth, CreatedAt: at, UpdatedAt: at},
		"Full": {Enabled: false, Revision: 9, Health: HealthDegraded, CreatedAt: storeT0, UpdatedAt: at,
			Settings:     map[string]string{"tenant_id": "t", "label": "x"},
			Verdict:      &Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401, CheckedAt: at, Revision: 8},
			Transient:    Transient{Failures: 3, LastError: "503", LastAt: at},
			Confirmation: Confirmation{Invalids: 1, Revision: 9, Reason: "r", Status: 403, FirstAt: at},
			Refresh:      RefreshStatus{Failures: 2, LastError: "timeout", LastAt: at, RefreshedAt: storeT0}},
		"CurrentVerdict": {Enabled: true, Revision: 9, Health: HealthOK, CreatedAt: at, UpdatedAt: at,
			Verdict: &Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, CheckedAt: at, Revision: 9}},
	}
	for name, c := range tests {
		t.Run(name, func(t *testing.T) {
			b, err := encodeData(c)
			require.NoError(t, err)
			var got Connection
			require.NoError(t, decodeData(b, &got))
			require.Equal(t, c, &got)
		})
	}
	creds := Credentials{AccessToken: "a", RefreshToken: "r", ExpiresAt: at, IssuedAt: storeT0, APIKey: "k",
		Username: "u", Password: "p", Extra: map[string]string{"client_code": "x"}}
	b, err := encodeCreds(creds)
	require.NoError(t, err)
	got, err := decodeCreds(b)
	require.NoError(t, err)
	require.Equal(t, creds, got)
	b, err = encodeCreds(Credentials{})
	require.NoError(t, err)
	require.Equal(t, []byte{credsFormatV1, 0}, b)
}

// TestEventsAfterWrite runs the Redis Cluster path (events appended right
// after the write instead of inside its script) on a single Redis.
func TestEventsAfterWrite(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	b.store.cluster = true
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	require.Len(t, ch.Events, 1)
	require.NotEmpty(t, ch.Events[0].ID)
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed})
	require.NoError(t, err)
	evs, err := b.store.ReadEvents(ctx, "0", 10)
	require.NoError(t, err)
	require.Equal(t, []string{EventCreated, EventCallable}, eventTypes(evs))
	require.Equal(t, ch.Events, evs[1:])
}

func TestPutKeepsIssuedAtOfSameToken(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	exp := storeT0.Add(time.Hour)
	ch, err := b.store.Put(ctx, refSF, sfInput("at", "rt", exp), 0)
	require.NoError(t, err)
	b.clock.Advance(10 * time.Minute)
	ch2, err := b.store.Put(ctx, refSF, sfInput("at", "rt", exp), 0)
	require.NoError(t, err)
	require.Equal(t, ch.After.Credentials, ch2.After.Credentials)
	require.Equal(t, ch.After.Version, ch2.After.Version, "nothing changed, nothing written")
	ch3, err := b.store.Put(ctx, refSF, sfInput("at", "rt-2", exp), 0)
	require.NoError(t, err)
	require.Equal(t, storeT0, ch3.After.Credentials.IssuedAt)
	require.Equal(t, ch.After.Revision+1, ch3.After.Revision)
}
