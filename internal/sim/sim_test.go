package sim

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2025, 3, 14, 9, 0, 0, 0, time.UTC)

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

type testBundle struct {
	p     *Providers
	clock *testClock
	hc    *http.Client
	cat   *catalog.Catalog
	env   map[string]string
}

func setup(t *testing.T, mods ...func(*Config)) *testBundle {
	t.Helper()
	clock := &testClock{now: t0}
	cfg := Config{RandSeed: 42, NowFunc: clock.Now}
	for _, m := range mods {
		m(&cfg)
	}
	p, err := Start(context.Background(), cfg)
	require.NoError(t, err)
	tr := &http.Transport{}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		require.NoError(t, p.Close())
	})
	cat, err := catalog.Parse(p.CatalogYAML())
	require.NoError(t, err)
	return &testBundle{p: p, clock: clock, hc: &http.Client{Transport: tr, Timeout: 10 * time.Second}, cat: cat, env: p.ClientEnv()}
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a answer) json(t *testing.T) any {
	t.Helper()
	var v any
	require.NoError(t, json.Unmarshal(a.body, &v), "body: %s", a.body)
	return v
}

func (b *testBundle) do(t *testing.T, req *http.Request) answer {
	t.Helper()
	res, err := b.hc.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return answer{status: res.StatusCode, header: res.Header, body: body}
}

func (b *testBundle) get(t *testing.T, u string, mod func(*http.Request)) answer {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	require.NoError(t, err)
	if mod != nil {
		mod(req)
	}
	return b.do(t, req)
}

func withBearer(token string) func(*http.Request) {
	return func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+token) }
}

// postToken posts a refresh_token grant; basic sends the client
// credentials as HTTP basic, otherwise as form parameters.
func (b *testBundle) postToken(t *testing.T, provider, refresh string, basic bool) answer {
	t.Helper()
	id, secret := b.env[envSalesforceID], b.env[envSalesforceSecret]
	path := "/services/oauth2/token"
	if provider == Xero {
		id, secret, path = b.env[envXeroID], b.env[envXeroSecret], "/connect/token"
	}
	return b.postTokenAs(t, b.p.BaseURL(provider)+path, refresh, id, secret, basic)
}

func (b *testBundle) postTokenAs(t *testing.T, u, refresh, id, secret string, basic bool) answer {
	t.Helper()
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}
	if !basic {
		form.Set("client_id", id)
		form.Set("client_secret", secret)
	}
	req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if basic {
		req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	}
	return b.do(t, req)
}

// refresh exchanges a refresh token with golang.org/x/oauth2 as the worker
// does, from the dev catalog and ClientEnv.
func (b *testBundle) refresh(t *testing.T, provider string, settings map[string]string, refresh string) (*oauth2.Token, error) {
	t.Helper()
	in, ok := b.cat.Get(provider)
	require.True(t, ok)
	u, err := in.TokenURL(settings)
	require.NoError(t, err)
	style := oauth2.AuthStyleInHeader
	if in.OAuth.AuthStyle == catalog.AuthStyleParams {
		style = oauth2.AuthStyleInParams
	}
	cfg := &oauth2.Config{
		ClientID:     b.env[in.OAuth.ClientIDEnv],
		ClientSecret: b.env[in.OAuth.ClientSecretEnv],
		Endpoint:     oauth2.Endpoint{TokenURL: u.String(), AuthStyle: style},
	}
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, b.hc)
	return cfg.TokenSource(ctx, &oauth2.Token{RefreshToken: refresh, Expiry: time.Unix(1, 0)}).Token()
}

// check makes the check request the dev catalog describes, as the worker
// would.
func (b *testBundle) check(t *testing.T, provider string, creds state.Credentials, settings map[string]string) answer {
	t.Helper()
	in, ok := b.cat.Get(provider)
	require.True(t, ok)
	u, err := in.CheckURL(settings)
	require.NoError(t, err)
	h, err := in.CheckHeaders(settings)
	require.NoError(t, err)
	req, err := http.NewRequest(in.Check.Method, u.String(), nil)
	require.NoError(t, err)
	req.Header = h
	a := in.Check.Auth
	field := func(f string) string {
		if v, ok := strings.CutPrefix(f, "literal:"); ok {
			return v
		}
		return creds.Get(f)
	}
	switch a.Scheme {
	case catalog.AuthSchemeBearer:
		req.Header.Set("Authorization", "Bearer "+creds.Get(a.Field))
	case catalog.AuthSchemeHeader:
		req.Header.Set(a.Name, a.Prefix+creds.Get(a.Field))
	case catalog.AuthSchemeBasic:
		req.SetBasicAuth(field(a.Username), field(a.Password))
	default:
		t.Fatalf("scheme %q", a.Scheme)
	}
	return b.do(t, req)
}

func sfCreds(g OAuthGrant) state.Credentials {
	return state.Credentials{AccessToken: g.AccessToken, RefreshToken: g.RefreshToken, ExpiresAt: g.ExpiresAt}
}

func oauthErrorOf(t *testing.T, a answer) string {
	t.Helper()
	var e oauthError
	require.NoError(t, json.Unmarshal(a.body, &e), "body: %s", a.body)
	return e.Error
}

func TestStartAndClose(t *testing.T) {
	t.Parallel()

	t.Run("StopsWhenContextIsDone", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		p, err := Start(ctx, Config{})
		require.NoError(t, err)
		hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		for _, id := range ProviderIDs() {
			u := p.BaseURL(id)
			require.True(t, strings.HasPrefix(u, "http://127.0.0.1:"), u)
			res, err := hc.Get(u + "/nothing-here")
			require.NoError(t, err)
			res.Body.Close()
			require.Equal(t, http.StatusNotFound, res.StatusCode)
		}
		require.Empty(t, p.BaseURL("hubspot"))
		cancel()
		require.Eventually(t, func() bool {
			c, err := net.DialTimeout("tcp", strings.TrimPrefix(p.BaseURL(Xero), "http://"), time.Second)
			if err == nil {
				c.Close()
			}
			return err != nil
		}, 5*time.Second, 10*time.Millisecond)
		require.NoError(t, p.Close())
		require.NoError(t, p.Close())
	})

	t.Run("CloseThenCancel", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		p, err := Start(ctx, Config{})
		require.NoError(t, err)
		require.NoError(t, p.Close())
		_, err = net.DialTimeout("tcp", strings.TrimPrefix(p.BaseURL(Salesforce), "http://"), time.Second)
		require.Error(t, err)
	})

	t.Run("Config", func(t *testing.T) {
		t.Parallel()
		tests := map[string]struct {
			cfg     Config
			wantErr string
		}{
			"NegativeSpeed":    {Config{Speed: -1}, "speed"},
			"NegativeTiming":   {Config{Timings: Timings{XeroGrace: -time.Second}}, "XeroGrace"},
			"EndlessOutage":    {Config{Timings: Timings{OutageFor: time.Minute, OutageEvery: time.Minute}}, "OutageFor"},
			"NaNSpeed":         {Config{Speed: nan()}, "speed"},
			"ZeroValueWorks":   {Config{}, ""},
			"TimingsOverrides": {Config{Timings: Timings{CallableEvery: time.Second}}, ""},
		}
		for name, tt := range tests {
			t.Run(name, func(t *testing.T) {
				p, err := Start(context.Background(), tt.cfg)
				if tt.wantErr != "" {
					require.ErrorContains(t, err, tt.wantErr)
					return
				}
				require.NoError(t, err)
				require.NoError(t, p.Close())
			})
		}
	})

	t.Run("SpeedDividesTimings", func(t *testing.T) {
		t.Parallel()
		b := setup(t, func(c *Config) { c.Speed = 2 })
		tm := b.p.Timings()
		require.Equal(t, DefaultTimings.SalesforceTokenTTL/2, tm.SalesforceTokenTTL)
		require.Equal(t, DefaultTimings.CallableEvery/2, tm.CallableEvery)
		in, _ := b.cat.Get(Xero)
		require.Equal(t, DefaultTimings.XeroTokenTTL/2, in.TokenLifetime.D())
		require.Equal(t, DefaultTimings.CallableEvery/2, in.Interval("callable"))
	})
}

func nan() float64 {
	zero := 0.0
	return zero / zero
}

func TestSalesforce(t *testing.T) {
	t.Parallel()
	ttl := DefaultTimings.SalesforceTokenTTL

	t.Run("CheckValid", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce, Account("acme"))
		require.NoError(t, err)
		require.Equal(t, b.p.BaseURL(Salesforce), g.InstanceURL)
		require.Equal(t, t0.Add(ttl), g.ExpiresAt)
		require.Empty(t, g.Tenants)
		a := b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(g.AccessToken))
		require.Equal(t, http.StatusOK, a.status, "%s", a.body)
		body := a.json(t).(map[string]any)
		require.Equal(t, "admin@acme.example", body["preferred_username"])
		require.NotEmpty(t, body["organization_id"])
	})

	t.Run("ExpiredOrUnknownTokenIs401", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce)
		require.NoError(t, err)
		b.clock.Advance(ttl - time.Second)
		require.Equal(t, http.StatusOK, b.check(t, Salesforce, sfCreds(g), map[string]string{"instance_url": g.InstanceURL}).status)
		b.clock.Advance(time.Second)
		for _, tok := range []string{g.AccessToken, "00Dnope!x", ""} {
			a := b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(tok))
			require.Equal(t, http.StatusUnauthorized, a.status)
			require.JSONEq(t, `[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]`, string(a.body))
		}
		a := b.get(t, g.InstanceURL+"/services/oauth2/userinfo", nil)
		require.Equal(t, http.StatusUnauthorized, a.status)
	})

	t.Run("RefreshRotatesWithoutExpiresIn", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce, ExpiresIn(-time.Minute))
		require.NoError(t, err)
		require.Equal(t, http.StatusUnauthorized, b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(g.AccessToken)).status)

		a := b.postToken(t, Salesforce, g.RefreshToken, false)
		require.Equal(t, http.StatusOK, a.status, "%s", a.body)
		require.Equal(t, "no-store", a.header.Get("Cache-Control"))
		body := a.json(t).(map[string]any)
		require.NotContains(t, body, "expires_in")
		require.Equal(t, "Bearer", body["token_type"])
		require.Equal(t, g.InstanceURL, body["instance_url"])
		require.Equal(t, strconv.FormatInt(t0.UnixMilli(), 10), body["issued_at"])
		newAccess, newRefresh := body["access_token"].(string), body["refresh_token"].(string)
		require.NotEmpty(t, newAccess)
		require.NotEmpty(t, newRefresh)
		require.NotEqual(t, g.RefreshToken, newRefresh)

		require.Equal(t, http.StatusOK, b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(newAccess)).status)

		// The used refresh token is dead at once.
		a = b.postToken(t, Salesforce, g.RefreshToken, false)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.JSONEq(t, `{"error":"invalid_grant","error_description":"expired access/refresh token"}`, string(a.body))
		// The new one works, with client credentials as HTTP basic too.
		a = b.postToken(t, Salesforce, newRefresh, true)
		require.Equal(t, http.StatusOK, a.status, "%s", a.body)
	})

	t.Run("WorkerStyleRefresh", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce)
		require.NoError(t, err)
		settings := map[string]string{"instance_url": g.InstanceURL}
		tok, err := b.refresh(t, Salesforce, settings, g.RefreshToken)
		require.NoError(t, err)
		require.True(t, tok.Expiry.IsZero(), "no expires_in: the worker uses the catalog's token_lifetime")
		require.NotEqual(t, g.RefreshToken, tok.RefreshToken)
		require.Equal(t, http.StatusOK, b.check(t, Salesforce, state.Credentials{AccessToken: tok.AccessToken}, settings).status)

		_, err = b.refresh(t, Salesforce, settings, g.RefreshToken)
		var re *oauth2.RetrieveError
		require.ErrorAs(t, err, &re)
		require.Equal(t, "invalid_grant", re.ErrorCode)
	})

	t.Run("ClientErrors", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce)
		require.NoError(t, err)
		u := b.p.BaseURL(Salesforce) + "/services/oauth2/token"
		a := b.postTokenAs(t, u, g.RefreshToken, "nope", "x", false)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "invalid_client_id", oauthErrorOf(t, a))
		a = b.postTokenAs(t, u, g.RefreshToken, b.env[envSalesforceID], "wrong", true)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "invalid_client", oauthErrorOf(t, a))

		req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(url.Values{
			"grant_type": {"password"}, "client_id": {b.env[envSalesforceID]}, "client_secret": {b.env[envSalesforceSecret]},
		}.Encode()))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		a = b.do(t, req)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "unsupported_grant_type", oauthErrorOf(t, a))

		// None of these used up the refresh token.
		require.Equal(t, http.StatusOK, b.postToken(t, Salesforce, g.RefreshToken, false).status)
	})

	t.Run("RevokedRefreshToken", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce, RevokedAfter(time.Minute))
		require.NoError(t, err)
		a := b.postToken(t, Salesforce, g.RefreshToken, false)
		require.Equal(t, http.StatusOK, a.status)
		next := a.json(t).(map[string]any)["refresh_token"].(string)

		b.clock.Advance(time.Minute)
		a = b.postToken(t, Salesforce, next, false)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "invalid_grant", oauthErrorOf(t, a))
		// The access token lives on until it expires.
		require.Equal(t, http.StatusOK, b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(g.AccessToken)).status)

		// Revoke, now.
		g2, err := b.p.IssueOAuth(Salesforce)
		require.NoError(t, err)
		require.NoError(t, b.p.Revoke(Salesforce, g2.RefreshToken))
		require.Equal(t, "invalid_grant", oauthErrorOf(t, b.postToken(t, Salesforce, g2.RefreshToken, false)))
		require.ErrorIs(t, b.p.Revoke(Salesforce, "nope"), ErrUnknownCredential)
		require.ErrorIs(t, b.p.Revoke("hubspot", "nope"), ErrUnknownProvider)

		st := b.p.Stats()[Salesforce]
		require.EqualValues(t, 2, st.Revocations)
		require.EqualValues(t, 2, st.InvalidGrants)
		require.EqualValues(t, 1, st.Rotations)
	})

	t.Run("ConcurrentRefreshesOneWins", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Salesforce)
		require.NoError(t, err)
		const n = 16
		statuses := make(chan answer, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range n {
			wg.Go(func() {
				<-start
				statuses <- b.postToken(t, Salesforce, g.RefreshToken, i%2 == 0)
			})
		}
		close(start)
		wg.Wait()
		close(statuses)
		var won, lost int
		for a := range statuses {
			switch a.status {
			case http.StatusOK:
				won++
			case http.StatusBadRequest:
				require.Equal(t, "invalid_grant", oauthErrorOf(t, a))
				lost++
			default:
				t.Fatalf("status %d: %s", a.status, a.body)
			}
		}
		require.Equal(t, 1, won)
		require.Equal(t, n-1, lost)
		st := b.p.Stats()[Salesforce]
		require.EqualValues(t, n, st.Refreshes)
		require.EqualValues(t, 1, st.Rotations)
		require.EqualValues(t, n-1, st.InvalidGrants)
	})
}

func TestXero(t *testing.T) {
	t.Parallel()
	ttl := DefaultTimings.XeroTokenTTL
	grace := DefaultTimings.XeroGrace

	t.Run("CheckListsTenants", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Xero, Account("acme"))
		require.NoError(t, err)
		require.Len(t, g.Tenants, 1)
		require.Equal(t, "Acme Ltd", g.Tenants[0].Name)
		require.Empty(t, g.InstanceURL)
		a := b.check(t, Xero, sfCreds(g), nil)
		require.Equal(t, http.StatusOK, a.status, "%s", a.body)
		list := a.json(t).([]any)
		require.Len(t, list, 1)
		c := list[0].(map[string]any)
		require.Equal(t, g.Tenants[0].ID, c["tenantId"])
		require.Equal(t, "Acme Ltd", c["tenantName"])
		require.Equal(t, "ORGANISATION", c["tenantType"])
	})

	t.Run("ExpiredTokenIs401", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Xero)
		require.NoError(t, err)
		b.clock.Advance(ttl)
		a := b.check(t, Xero, sfCreds(g), nil)
		require.Equal(t, http.StatusUnauthorized, a.status)
		require.Contains(t, string(a.body), "TokenExpired")
	})

	t.Run("RefreshWithGracePeriod", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Xero)
		require.NoError(t, err)
		a := b.postToken(t, Xero, g.RefreshToken, true)
		require.Equal(t, http.StatusOK, a.status, "%s", a.body)
		body := a.json(t).(map[string]any)
		require.EqualValues(t, ttl/time.Second, body["expires_in"])
		require.Equal(t, "Bearer", body["token_type"])
		require.NotEqual(t, g.RefreshToken, body["refresh_token"])

		// The previous refresh token stays usable for the grace period,
		// counted from its first use.
		b.clock.Advance(grace - time.Second)
		require.Equal(t, http.StatusOK, b.postToken(t, Xero, g.RefreshToken, true).status)
		b.clock.Advance(time.Second)
		a = b.postToken(t, Xero, g.RefreshToken, true)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.JSONEq(t, `{"error":"invalid_grant"}`, string(a.body))

		// x/oauth2, as the worker calls it (client credentials in the
		// header): expires_in gives the expiry.
		tok, err := b.refresh(t, Xero, nil, body["refresh_token"].(string))
		require.NoError(t, err)
		require.WithinDuration(t, time.Now().Add(ttl), tok.Expiry, 10*time.Second)
	})

	t.Run("RevokedGrant", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Xero, RevokedAfter(time.Second))
		require.NoError(t, err)
		b.clock.Advance(time.Second)
		a := b.postToken(t, Xero, g.RefreshToken, false)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "invalid_grant", oauthErrorOf(t, a))
	})

	t.Run("WrongClient", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		g, err := b.p.IssueOAuth(Xero)
		require.NoError(t, err)
		a := b.postTokenAs(t, b.p.BaseURL(Xero)+"/connect/token", g.RefreshToken, b.env[envSalesforceID], b.env[envSalesforceSecret], true)
		require.Equal(t, http.StatusBadRequest, a.status)
		require.Equal(t, "invalid_client", oauthErrorOf(t, a))
	})
}

func TestBambooHR(t *testing.T) {
	t.Parallel()
	b := setup(t)
	k, err := b.p.IssueAPIKey(BambooHR, Account("acme"))
	require.NoError(t, err)
	require.Equal(t, "acme", k.Subdomain)
	other, err := b.p.IssueAPIKey(BambooHR, Account("globex"))
	require.NoError(t, err)
	later, err := b.p.IssueAPIKey(BambooHR, Account("acme"), RevokedAfter(time.Minute))
	require.NoError(t, err)
	acme := map[string]string{"subdomain": "acme"}

	a := b.check(t, BambooHR, state.Credentials{APIKey: k.Key}, acme)
	require.Equal(t, http.StatusOK, a.status)
	require.NotEmpty(t, a.json(t).([]any))

	// Without Accept: application/json, XML.
	a = b.get(t, b.p.BaseURL(BambooHR)+"/api/gateway.php/acme/v1/meta/fields", func(r *http.Request) { r.SetBasicAuth(k.Key, "x") })
	require.Equal(t, http.StatusOK, a.status)
	require.True(t, strings.HasPrefix(string(a.body), "<?xml"))

	tests := map[string]struct {
		key      string
		settings map[string]string
		want     int
	}{
		"WrongKey":          {b.p.WrongAPIKey(), acme, http.StatusUnauthorized},
		"EmptyKey":          {"", acme, http.StatusUnauthorized},
		"KeyOfOtherCompany": {other.Key, acme, http.StatusUnauthorized},
		"UnknownSubdomain":  {k.Key, map[string]string{"subdomain": "acme-old"}, http.StatusNotFound},
		"RevokedLaterValid": {later.Key, acme, http.StatusOK},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			a := b.check(t, BambooHR, state.Credentials{APIKey: tt.key}, tt.settings)
			require.Equal(t, tt.want, a.status)
			in, _ := b.cat.Get(BambooHR)
			require.Equal(t, tt.want != http.StatusOK, in.IsInvalidStatus(a.status))
		})
	}

	b.clock.Advance(time.Minute)
	require.Equal(t, http.StatusUnauthorized, b.check(t, BambooHR, state.Credentials{APIKey: later.Key}, acme).status)
	require.Equal(t, http.StatusOK, b.check(t, BambooHR, state.Credentials{APIKey: k.Key}, acme).status)
	require.NoError(t, b.p.Revoke(BambooHR, k.Key))
	require.Equal(t, http.StatusUnauthorized, b.check(t, BambooHR, state.Credentials{APIKey: k.Key}, acme).status)

	st := b.p.Stats()[BambooHR]
	require.EqualValues(t, 2, st.Revocations)
	require.EqualValues(t, 10, st.Checks)
	require.EqualValues(t, 4, st.ChecksOK)
	require.EqualValues(t, 6, st.ChecksRejected)
	require.EqualValues(t, 1, st.Calls[Call{Endpoint: EndpointCheck, Status: http.StatusNotFound}])
}

func TestPipedrive(t *testing.T) {
	t.Parallel()
	tm := DefaultTimings

	t.Run("OutagesNeverRejectAValidKey", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		k, err := b.p.IssueAPIKey(Pipedrive, Account("acme"))
		require.NoError(t, err)
		require.Empty(t, k.Subdomain)
		creds := state.Credentials{APIKey: k.Key}

		a := b.check(t, Pipedrive, creds, nil)
		require.Equal(t, http.StatusOK, a.status)
		require.Equal(t, true, a.json(t).(map[string]any)["success"])
		require.Equal(t, http.StatusUnauthorized, b.check(t, Pipedrive, state.Credentials{APIKey: b.p.WrongAPIKey()}, nil).status)
		// The query parameter works too.
		require.Equal(t, http.StatusOK, b.get(t, b.p.BaseURL(Pipedrive)+"/v1/users/me?api_token="+k.Key, nil).status)

		// Into the first outage window.
		b.clock.Advance(tm.OutageStart)
		seen := map[int]int{}
		for range 60 {
			a := b.check(t, Pipedrive, creds, nil)
			seen[a.status]++
			switch a.status {
			case http.StatusBadGateway, http.StatusServiceUnavailable:
				require.Equal(t, "text/html", a.header.Get("Content-Type"))
				require.Contains(t, string(a.body), "<html>")
			case http.StatusTooManyRequests:
				secs, err := strconv.Atoi(a.header.Get("Retry-After"))
				require.NoError(t, err)
				require.Equal(t, 1, secs)
			default:
				t.Fatalf("status %d during an outage", a.status)
			}
		}
		require.Positive(t, seen[http.StatusBadGateway]+seen[http.StatusServiceUnavailable], "%v", seen)
		require.Positive(t, seen[http.StatusTooManyRequests], "%v", seen)

		// Walk through several windows: never a 401 for the valid key.
		b.clock.Advance(-tm.OutageStart)
		ok, bad := 0, 0
		for range int(3 * tm.OutageEvery / time.Second) {
			a := b.check(t, Pipedrive, creds, nil)
			require.NotEqual(t, http.StatusUnauthorized, a.status)
			if a.status == http.StatusOK {
				ok++
			} else {
				bad++
			}
			b.clock.Advance(time.Second)
		}
		require.Equal(t, int(3*tm.OutageFor/time.Second), bad)
		require.Equal(t, int(3*(tm.OutageEvery-tm.OutageFor)/time.Second), ok)

		st := b.p.Stats()[Pipedrive]
		require.Positive(t, st.ServerErrors)
		require.Positive(t, st.Throttled)
		require.EqualValues(t, 1, st.ChecksRejected)
	})

	t.Run("StartOutage", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		k, err := b.p.IssueAPIKey(Pipedrive)
		require.NoError(t, err)
		creds := state.Credentials{APIKey: k.Key}
		b.p.StartOutage(5 * time.Second)
		require.NotEqual(t, http.StatusOK, b.check(t, Pipedrive, creds, nil).status)
		// Even a wrong key gets provider trouble, not a 401.
		require.NotEqual(t, http.StatusUnauthorized, b.check(t, Pipedrive, state.Credentials{APIKey: "nope"}, nil).status)
		b.clock.Advance(5 * time.Second)
		require.Equal(t, http.StatusOK, b.check(t, Pipedrive, creds, nil).status)
	})
}

func TestIssueErrors(t *testing.T) {
	t.Parallel()
	b := setup(t)
	_, err := b.p.IssueOAuth(BambooHR)
	require.ErrorIs(t, err, ErrUnknownProvider)
	_, err = b.p.IssueAPIKey(Xero)
	require.ErrorIs(t, err, ErrUnknownProvider)
	_, err = b.p.IssueOAuth("hubspot")
	require.ErrorIs(t, err, ErrUnknownProvider)
}

func TestStats(t *testing.T) {
	t.Parallel()
	b := setup(t)
	g, err := b.p.IssueOAuth(Salesforce)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, b.get(t, g.InstanceURL+"/services/oauth2/userinfo", withBearer(g.AccessToken)).status)
	require.Equal(t, http.StatusOK, b.postToken(t, Salesforce, g.RefreshToken, false).status)
	require.Equal(t, http.StatusBadRequest, b.postToken(t, Salesforce, g.RefreshToken, false).status)
	require.Equal(t, http.StatusNotFound, b.get(t, b.p.BaseURL(Xero)+"/nope", nil).status)

	st := b.p.Stats()
	require.Len(t, st, len(ProviderIDs()))
	sf := st[Salesforce]
	require.EqualValues(t, 1, sf.Checks)
	require.EqualValues(t, 1, sf.ChecksOK)
	require.EqualValues(t, 2, sf.Refreshes)
	require.EqualValues(t, 1, sf.Rotations)
	require.EqualValues(t, 1, sf.InvalidGrants)
	require.Equal(t, map[Call]int64{
		{EndpointCheck, http.StatusOK}: 1, {EndpointToken, http.StatusOK}: 1, {EndpointToken, http.StatusBadRequest}: 1,
	}, sf.Calls)
	require.EqualValues(t, 1, st[Xero].Calls[Call{EndpointOther, http.StatusNotFound}])
	total := st.Total()
	require.EqualValues(t, 1, total.Checks)
	require.EqualValues(t, 2, total.Refreshes)
	require.Contains(t, total.String(), "refreshes 2 (rotated 1, invalid_grant 1)")
}

func TestCatalogYAML(t *testing.T) {
	t.Parallel()
	b := setup(t)
	require.Equal(t, []string{Salesforce, BambooHR, Xero, Pipedrive}, b.cat.IDs())
	tm := DefaultTimings
	settings := map[string]map[string]string{
		Salesforce: {"instance_url": b.p.BaseURL(Salesforce)},
		BambooHR:   {"subdomain": "acme"},
		Xero:       {"tenant_id": "8d6f7c1e-0000-4000-a000-000000000000"},
		Pipedrive:  {},
	}
	for _, id := range ProviderIDs() {
		t.Run(id, func(t *testing.T) {
			in, ok := b.cat.Get(id)
			require.True(t, ok)
			require.Equal(t, UnifiedAPI(id), in.UnifiedAPI)
			require.True(t, in.Checkable())
			require.True(t, in.AllowHTTP)
			base, err := url.Parse(b.p.BaseURL(id))
			require.NoError(t, err)
			require.Equal(t, []string{base.Host}, in.AllowedHosts)
			require.NoError(t, in.ValidateSettings(settings[id]))

			u, err := in.CheckURL(settings[id])
			require.NoError(t, err)
			require.Equal(t, base.Host, u.Host)
			require.Equal(t, tm.CallableEvery, in.Interval("callable"))
			require.Equal(t, tm.InvalidEvery, in.Interval("invalid"))
			require.Equal(t, tm.AddedEvery, in.Interval("added"))

			if in.AuthType == catalog.AuthOAuth2 {
				tu, err := in.TokenURL(settings[id])
				require.NoError(t, err)
				require.Equal(t, base.Host, tu.Host)
				require.NotEmpty(t, b.env[in.OAuth.ClientIDEnv])
				require.NotEmpty(t, b.env[in.OAuth.ClientSecretEnv])
				require.Equal(t, tm.RefreshWindow, in.RefreshWindow.D())
				require.Less(t, in.RefreshWindow.D(), in.TokenLifetime.D())
				// A refreshed token is not due again at once, and is
				// refreshed before it counts as expired.
				require.Greater(t, in.TokenLifetime.D(), state.ExpirySkew+2*time.Minute)
				require.Greater(t, in.RefreshWindow.D(), state.ExpirySkew)
			}
		})
	}
	sf, _ := b.cat.Get(Salesforce)
	require.Equal(t, DefaultTimings.SalesforceTokenTTL, sf.TokenLifetime.D())
	// A foreign host in a setting is refused.
	require.ErrorIs(t, sf.ValidateSettings(map[string]string{"instance_url": "http://169.254.169.254"}), catalog.ErrHostNotAllowed)
	require.ErrorIs(t, sf.ValidateSettings(map[string]string{"instance_url": b.p.BaseURL(Xero)}), catalog.ErrHostNotAllowed)
	require.Len(t, b.env, 4)
}

// fakeWriter records Puts and checks them as the store would.
type fakeWriter struct {
	cat *catalog.Catalog
	mu  sync.Mutex
	// conns are the connections written, built from the inputs.
	conns map[state.Ref]*state.Connection
	puts  int
	fail  error
}

func (f *fakeWriter) Put(_ context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return state.Change{}, f.fail
	}
	api, svc, ok := state.SplitConnectionID(ref.ConnectionID)
	if !ok {
		return state.Change{}, errors.New("bad connection id")
	}
	integ, err := f.cat.Lookup(api, svc)
	if err != nil {
		return state.Change{}, err
	}
	if err := integ.ValidateSettings(in.Settings); err != nil {
		return state.Change{}, err
	}
	if ifVersion != 0 {
		return state.Change{}, errors.New("seed must not use ifVersion")
	}
	f.puts++
	c := f.conns[ref]
	before := c
	if c == nil {
		c = &state.Connection{ID: ref.ConnectionID, ConsumerID: ref.ConsumerID, ServiceID: svc, UnifiedAPI: api, Enabled: true}
		f.conns[ref] = c
	}
	if in.Credentials != nil {
		c.Credentials = state.Credentials{}
		for k, v := range in.Credentials {
			allowed := contains(integ.CredentialFields, k) ||
				integ.AuthType == catalog.AuthOAuth2 && (k == catalog.FieldAccessToken || k == catalog.FieldRefreshToken || k == catalog.FieldExpiresAt)
			if !allowed {
				return state.Change{}, errors.New("unknown credential field " + k)
			}
			if err := c.Credentials.Set(k, v); err != nil {
				return state.Change{}, err
			}
		}
	}
	if in.Settings != nil {
		c.Settings = in.Settings
	}
	c.Version++
	c.State, c.Health = state.Derive(c, integ, t0)
	after := *c
	return state.Change{Before: before, After: &after}, nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func TestSeed(t *testing.T) {
	t.Parallel()
	b := setup(t)
	w := &fakeWriter{cat: b.cat, conns: map[state.Ref]*state.Connection{}}
	seeded, err := Seed(context.Background(), w, b.p, DefaultConsumers)
	require.NoError(t, err)

	// Every state is expected among the first MinConsumers consumers.
	expect := map[state.State]int{}
	then := map[state.State]int{}
	for _, sc := range seeded {
		if sc.Ref.ConsumerID == consumerName(0) || sc.Ref.ConsumerID == consumerName(MinConsumers-1) {
			expect[sc.Expect]++
		}
		then[sc.Then]++
	}
	for _, st := range state.States() {
		require.Positive(t, expect[st], "no demo connection shows %s", st)
	}
	// Some connections are revoked later, some get their tenant later.
	require.Equal(t, 2, then[state.Invalid])
	require.Equal(t, 2, then[state.Callable])

	written := 0
	for _, sc := range seeded {
		require.NotEmpty(t, sc.Story)
		require.Equal(t, state.ConnectionID(sc.UnifiedAPI, sc.ServiceID), sc.Ref.ConnectionID)
		c := w.conns[sc.Ref]
		if !sc.Written {
			require.Equal(t, state.Available, sc.Expect)
			require.Nil(t, c, "%s was written", sc.Ref)
			continue
		}
		written++
		require.NotNil(t, c, "%s was not written", sc.Ref)
		require.Equal(t, c.Version, sc.Version)
		verifySeeded(t, b, sc, c)
	}
	require.Equal(t, written, w.puts)
	// Refs lists exactly what was written; the first consumer (the
	// README's tour: acme) has an integration left available.
	var refs []state.Ref
	acmeAvailable := 0
	for _, sc := range seeded {
		if sc.Written {
			refs = append(refs, sc.Ref)
		} else if sc.Ref.ConsumerID == "acme" {
			acmeAvailable++
		}
	}
	require.Equal(t, refs, Refs(DefaultConsumers))
	require.Positive(t, acmeAvailable, "acme shows an available integration")

	// Later: revocations take effect, tenants are chosen.
	b.clock.Advance(max(DefaultTimings.RevokeAfter, DefaultTimings.KeyRevokeAfter))
	for _, sc := range seeded {
		c := w.conns[sc.Ref]
		switch {
		case sc.Then == state.Invalid && sc.ServiceID == Salesforce:
			_, err := b.refresh(t, Salesforce, c.Settings, c.Credentials.RefreshToken)
			var re *oauth2.RetrieveError
			require.ErrorAs(t, err, &re, sc.Story)
			require.Equal(t, "invalid_grant", re.ErrorCode)
		case sc.Then == state.Invalid:
			a := b.check(t, sc.ServiceID, c.Credentials, c.Settings)
			require.Equal(t, http.StatusUnauthorized, a.status, sc.Story)
		case sc.Then == state.Callable:
			require.Equal(t, Xero, sc.ServiceID)
			ch, err := ChooseTenant(context.Background(), w, sc)
			require.NoError(t, err)
			require.Equal(t, state.Callable, ch.After.State)
			require.Equal(t, http.StatusOK, b.check(t, Xero, c.Credentials, c.Settings).status)
		default:
			require.Empty(t, sc.Then)
		}
	}
	_, err = ChooseTenant(context.Background(), w, seeded[0])
	require.ErrorContains(t, err, "no tenant")

	require.EqualValues(t, 2, b.p.Stats().Total().Revocations)
}

// verifySeeded checks that a seeded connection's facts lead to its
// expected state: through the state rule, and through the providers.
func verifySeeded(t *testing.T, b *testBundle, sc SeededConnection, c *state.Connection) {
	t.Helper()
	in, _ := b.cat.Get(sc.ServiceID)
	oauth := in.AuthType == catalog.AuthOAuth2
	switch sc.Expect {
	case state.Added:
		require.Equal(t, state.Added, c.State, sc.Story)
		require.Equal(t, state.HealthNeedsAuth, c.Health, sc.Story)
		return
	case state.Authorized:
		require.Equal(t, state.Authorized, c.State, sc.Story)
		require.NotEmpty(t, sc.TenantID)
		require.Equal(t, http.StatusOK, b.check(t, sc.ServiceID, c.Credentials, c.Settings).status, sc.Story)
		return
	}
	if oauth {
		// OAuth with tokens and settings: callable without a verdict.
		require.Equal(t, state.Callable, c.State, sc.Story)
	} else {
		// Credentials entered, awaiting the first check.
		require.Equal(t, state.Added, c.State, sc.Story)
	}
	creds := c.Credentials
	if oauth && !b.clock.Now().Before(creds.ExpiresAt) {
		// The worker refreshes an expired token before checking.
		tok, err := b.refresh(t, sc.ServiceID, c.Settings, creds.RefreshToken)
		require.NoError(t, err, sc.Story)
		creds = state.Credentials{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken}
	}
	a := b.check(t, sc.ServiceID, creds, c.Settings)
	switch sc.Expect {
	case state.Callable:
		require.Equal(t, http.StatusOK, a.status, sc.Story)
	case state.Invalid:
		require.True(t, in.IsInvalidStatus(a.status), "%s: status %d", sc.Story, a.status)
	default:
		t.Fatalf("unexpected expectation %s", sc.Expect)
	}
}

func TestSeedSizes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	w := &fakeWriter{cat: b.cat, conns: map[state.Ref]*state.Connection{}}

	_, err := Seed(context.Background(), w, b.p, 1)
	require.ErrorIs(t, err, ErrTooFewConsumers)

	seeded, err := Seed(context.Background(), w, b.p, 0)
	require.NoError(t, err)
	consumers := map[string]bool{}
	for _, sc := range seeded {
		consumers[sc.Ref.ConsumerID] = true
	}
	require.Len(t, consumers, DefaultConsumers)
	require.Len(t, seeded, DefaultConsumers*len(ProviderIDs()))

	seeded, err = Seed(context.Background(), w, b.p, 2*len(consumerNames)+1)
	require.NoError(t, err)
	consumers = map[string]bool{}
	for _, sc := range seeded {
		consumers[sc.Ref.ConsumerID] = true
	}
	require.Len(t, consumers, 2*len(consumerNames)+1)
	require.True(t, consumers["acme-3"])

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = Seed(ctx, w, b.p, 0)
	require.ErrorIs(t, err, context.Canceled)

	w.fail = errors.New("boom")
	_, err = Seed(context.Background(), w, b.p, 0)
	require.ErrorContains(t, err, "boom")
}

// TestSeedIntoStore seeds a real store built on the dev catalog: the
// store accepts every write and derives the expected states.
func TestSeedIntoStore(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rdb := redistest.New(t).Client(t)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	store, err := state.New(state.Config{Client: rdb, Catalog: b.cat, Keys: keys, NowFunc: b.clock.Now})
	require.NoError(t, err)
	ctx := context.Background()
	seeded, err := Seed(ctx, store, b.p, 0)
	require.NoError(t, err)
	for _, sc := range seeded {
		c, err := store.Get(ctx, sc.Ref)
		if !sc.Written {
			require.ErrorIs(t, err, state.ErrNotFound)
			continue
		}
		require.NoError(t, err)
		require.Equal(t, sc.Version, c.Version)
		in, _ := b.cat.Get(sc.ServiceID)
		want := sc.Expect
		if in.AuthType != catalog.AuthOAuth2 && want != state.Added {
			want = state.Added // until the first check
		}
		require.Equal(t, want, c.State, "%s: %s", sc.Ref, sc.Story)
		if sc.TenantID != "" {
			ch, err := ChooseTenant(ctx, store, sc)
			require.NoError(t, err)
			require.Equal(t, state.Callable, ch.After.State)
		}
	}
}
