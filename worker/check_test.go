package worker

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"golang.org/x/oauth2"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

func integ(t *testing.T, cat *catalog.Catalog, id string) *catalog.Integration {
	t.Helper()
	in, ok := cat.Get(id)
	require.True(t, ok, id)
	return in
}

func TestBuildCheckRequest(t *testing.T) {
	t.Parallel()
	cat := testCatalog(t, "127.0.0.1:8080")
	cases := map[string]struct {
		integration string
		creds       state.Credentials
		settings    map[string]string
		check       func(t *testing.T, r *http.Request)
		wantErr     bool
	}{
		"HeaderWithPrefix": {
			integration: "acme", creds: state.Credentials{APIKey: secretAPIKey},
			check: func(t *testing.T, r *http.Request) {
				require.Equal(t, "Token "+secretAPIKey, r.Header.Get("X-Api-Token"))
				require.Equal(t, "http://127.0.0.1:8080/acme/me", r.URL.String())
				require.Equal(t, http.MethodGet, r.Method)
				require.Equal(t, "application/json", r.Header.Get("Accept"))
			},
		},
		"Bearer": {
			integration: "oco", creds: state.Credentials{AccessToken: secretAccess, RefreshToken: secretRefresh},
			check: func(t *testing.T, r *http.Request) {
				require.Equal(t, "Bearer "+secretAccess, r.Header.Get("Authorization"))
			},
		},
		"Query": {
			integration: "qkey", creds: state.Credentials{APIKey: secretAPIKey},
			check: func(t *testing.T, r *http.Request) {
				require.Equal(t, secretAPIKey, r.URL.Query().Get("api_token"))
				require.Empty(t, r.Header.Get("Authorization"))
			},
		},
		"BasicWithLiteralPassword": {
			integration: "bamboo", creds: state.Credentials{APIKey: secretAPIKey},
			settings: map[string]string{"subdomain": "acme"},
			check: func(t *testing.T, r *http.Request) {
				u, p, ok := r.BasicAuth()
				require.True(t, ok)
				require.Equal(t, secretAPIKey, u)
				require.Equal(t, "x", p)
				require.Equal(t, "/bamboo/acme/meta", r.URL.Path)
			},
		},
		"BasicDefaultFields": {
			integration: "zen", creds: state.Credentials{Username: "agent@example.com/token", Password: secretPassword},
			check: func(t *testing.T, r *http.Request) {
				require.Equal(t, "Basic "+base64.StdEncoding.EncodeToString([]byte("agent@example.com/token:"+secretPassword)),
					r.Header.Get("Authorization"))
			},
		},
		"SettingURLToAllowedHost": {
			integration: "inst", creds: state.Credentials{APIKey: secretAPIKey},
			settings: map[string]string{"instance_url": "http://127.0.0.1:8080"},
			check: func(t *testing.T, r *http.Request) {
				require.Equal(t, "http://127.0.0.1:8080/inst/me", r.URL.String())
				require.Equal(t, secretAPIKey, r.Header.Get("X-API-Key"))
			},
		},
		"SettingURLToOtherPortRefused": {
			integration: "inst", creds: state.Credentials{APIKey: secretAPIKey},
			settings: map[string]string{"instance_url": "http://127.0.0.1:9999"}, wantErr: true,
		},
		"SettingURLToMetadataRefused": {
			integration: "inst", creds: state.Credentials{APIKey: secretAPIKey},
			settings: map[string]string{"instance_url": "http://169.254.169.254"}, wantErr: true,
		},
		"MissingSetting": {
			integration: "bamboo", creds: state.Credentials{APIKey: secretAPIKey}, wantErr: true,
		},
		"MissingCredential": {
			integration: "acme", wantErr: true,
		},
		"HeaderValueWithCRLF": {
			integration: "acme", creds: state.Credentials{APIKey: secretAPIKey + "\r\nX-Injected: 1"}, wantErr: true,
		},
		"BearerWithNUL": {
			integration: "oco", creds: state.Credentials{AccessToken: secretAccess + "\x00", RefreshToken: secretRefresh}, wantErr: true,
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := &state.Connection{Credentials: tc.creds, Settings: tc.settings}
			req, err := buildCheckRequest(context.Background(), integ(t, cat, tc.integration), c)
			if tc.wantErr {
				require.ErrorIs(t, err, errMisconfigured)
				requireNoSecrets(t, err.Error())
				return
			}
			require.NoError(t, err)
			require.Equal(t, userAgent, req.Header.Get("User-Agent"))
			tc.check(t, req)
		})
	}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	cat := testCatalog(t, "127.0.0.1:8080")
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	retryAt := http.Header{"Retry-After": []string{now.Add(90 * time.Second).Format(http.TimeFormat)}}
	cases := map[string]struct {
		integration string
		status      int
		header      http.Header
		body        string
		over        bool
		want        kind
		wantReason  string
		wantAfter   time.Duration
	}{
		"200Valid":                   {integration: "acme", status: 200, want: kindValid, wantReason: state.ReasonCheckPassed},
		"204Valid":                   {integration: "acme", status: 204, want: kindValid, wantReason: state.ReasonCheckPassed},
		"401Invalid":                 {integration: "acme", status: 401, want: kindInvalid, wantReason: state.ReasonCredentialsRejected},
		"403InvalidPerCatalog":       {integration: "acme", status: 403, want: kindInvalid, wantReason: state.ReasonCredentialsRejected},
		"403TransientPerCatalog":     {integration: "only401", status: 403, want: kindTransient},
		"404MisconfiguredPerCatalog": {integration: "acme", status: 404, want: kindInvalid, wantReason: state.ReasonMisconfiguredAccount},
		"404TransientByDefault":      {integration: "only401", status: 404, want: kindTransient},
		"429Seconds":                 {integration: "acme", status: 429, header: http.Header{"Retry-After": []string{"7"}}, want: kindThrottled, wantAfter: 7 * time.Second},
		"429Date":                    {integration: "acme", status: 429, header: retryAt, want: kindThrottled, wantAfter: 90 * time.Second},
		"429NoHeader":                {integration: "acme", status: 429, want: kindThrottled},
		"500Transient":               {integration: "acme", status: 500, want: kindTransient},
		"503RetryAfter":              {integration: "acme", status: 503, header: http.Header{"Retry-After": []string{"30"}}, want: kindTransient, wantAfter: 30 * time.Second},
		"302Transient":               {integration: "acme", status: 302, want: kindTransient},
		"400Transient":               {integration: "acme", status: 400, want: kindTransient},
		"AssertHolds":                {integration: "zen", status: 200, body: `{"user":{"id":42}}`, want: kindValid, wantReason: state.ReasonCheckPassed},
		"AssertNull":                 {integration: "zen", status: 200, body: `{"user":{"id":null}}`, want: kindInvalid, wantReason: state.ReasonAssertionFailed},
		"AssertMissing":              {integration: "zen", status: 200, body: `{"user":{}}`, want: kindInvalid, wantReason: state.ReasonAssertionFailed},
		"AssertNotJSON":              {integration: "zen", status: 200, body: `<html>`, want: kindInvalid, wantReason: state.ReasonAssertionFailed},
		"AssertBodyOverCap":          {integration: "zen", status: 200, body: `{"user":{"id":4`, over: true, want: kindTransient},
		"AssertIgnoredOn401":         {integration: "zen", status: 401, body: `{"user":{"id":1}}`, want: kindInvalid, wantReason: state.ReasonCredentialsRejected},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := tc.header
			if h == nil {
				h = http.Header{}
			}
			r := classify(integ(t, cat, tc.integration), tc.status, h, []byte(tc.body), tc.over, nil, now)
			require.Equal(t, tc.want, r.kind, "kind %s", r.kind)
			require.Equal(t, tc.wantReason, r.reason)
			require.Equal(t, tc.wantAfter, r.retryAfter)
			require.Equal(t, tc.status, r.status)
		})
	}
}

func TestAssertHolds(t *testing.T) {
	t.Parallel()
	notNull := func(p string) *catalog.Assertion { return &catalog.Assertion{Path: p, NotNull: true} }
	require.True(t, assertHolds(notNull("a.b.c"), []byte(`{"a":{"b":{"c":"x"}}}`)))
	require.True(t, assertHolds(notNull("a.0.id"), []byte(`{"a":[{"id":1}]}`)))
	require.False(t, assertHolds(notNull("a.1.id"), []byte(`{"a":[{"id":1}]}`)))
	require.False(t, assertHolds(notNull("a.b"), []byte(`{"a":"str"}`)))
	require.True(t, assertHolds(notNull("a"), []byte(`{"a":0}`)))
	require.True(t, assertHolds(notNull("a"), []byte(`{"a":false}`)))
	require.True(t, assertHolds(&catalog.Assertion{Path: "a"}, []byte(`{"a":null}`)))
	require.False(t, assertHolds(&catalog.Assertion{Path: "b"}, []byte(`{"a":null}`)))
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	w := &Worker{cfg: Config{RetryBaseDelay: 2 * time.Second, RetryMaxDelay: time.Minute, MaxRetryAfter: time.Hour}}
	t.Run("HonoursRetryAfter", func(t *testing.T) {
		err := &RetryAfterError{After: 42 * time.Second, Err: errors.New("429")}
		require.Equal(t, 42*time.Second, w.RetryDelay(0, err, nil))
		require.Equal(t, 42*time.Second, w.RetryDelay(5, errors.Join(errors.New("wrapped"), err), nil))
	})
	t.Run("CapsRetryAfter", func(t *testing.T) {
		err := &RetryAfterError{After: 48 * time.Hour, Err: errors.New("429")}
		require.Equal(t, time.Hour, w.RetryDelay(0, err, nil))
	})
	t.Run("FullJitterCapped", func(t *testing.T) {
		for n := range 20 {
			ceiling := min(time.Minute, 2*time.Second<<n)
			var lo, hi time.Duration = time.Hour, 0
			for range 200 {
				d := w.RetryDelay(n, errors.New("500"), nil)
				require.GreaterOrEqual(t, d, time.Second)
				require.LessOrEqual(t, d, ceiling)
				lo, hi = min(lo, d), max(hi, d)
			}
			// Full jitter spreads retries over the whole range.
			require.Less(t, lo, time.Second+ceiling/4, "n=%d", n)
			require.Greater(t, hi, ceiling*3/4, "n=%d", n)
		}
	})
	t.Run("ExtraTaskTypes", func(t *testing.T) {
		w := &Worker{cfg: w.cfg}
		w.cfg.RetryDelays = map[string]asynq.RetryDelayFunc{
			"webhook:deliver": func(n int, _ error, _ *asynq.Task) time.Duration { return time.Duration(n) * time.Hour },
		}
		require.Equal(t, 3*time.Hour, w.RetryDelay(3, errors.New("x"), asynq.NewTask("webhook:deliver", nil)))
		require.LessOrEqual(t, w.RetryDelay(3, errors.New("x"), asynq.NewTask("connection:validate", nil)), time.Minute)
	})
	t.Run("HugeAttemptCount", func(t *testing.T) {
		require.LessOrEqual(t, w.RetryDelay(1000, errors.New("x"), nil), time.Minute)
	})
}

func TestSafeErr(t *testing.T) {
	t.Parallel()
	ue := &url.Error{Op: "Get", URL: "https://u:" + secretPassword + "@api.example.com/v1/me?api_key=" + secretAPIKey + "#frag",
		Err: errors.New("connection refused")}
	s := safeErr(ue)
	require.Equal(t, "get https://xxxxx@api.example.com/v1/me: connection refused", s) // user info masked (redact.URL)
	requireNoSecrets(t, s)

	resp := &http.Response{StatusCode: 400}
	re := &oauth2.RetrieveError{Response: resp, Body: []byte(`{"error":"invalid_grant","refresh_token":"` + secretRefresh + `"}`),
		ErrorCode: "invalid_grant", ErrorDescription: "token " + secretRefresh + " is dead"}
	s = safeErr(re)
	require.Equal(t, "token endpoint answered 400 invalid_grant", s)
	requireNoSecrets(t, s)
}

func TestRevokedGrant(t *testing.T) {
	t.Parallel()
	re := func(code int, errCode, body string) error {
		return &oauth2.RetrieveError{Response: &http.Response{StatusCode: code}, ErrorCode: errCode, Body: []byte(body)}
	}
	require.True(t, revokedGrant(re(400, "invalid_grant", "")))
	require.False(t, revokedGrant(re(401, "invalid_client", "")), "the fleet's client, not the connection")
	require.False(t, revokedGrant(re(400, "unauthorized_client", "")), "the fleet's client, not the connection")
	require.True(t, clientRejected(re(401, "invalid_client", "")))
	require.True(t, clientRejected(re(400, "unauthorized_client", "")))
	require.False(t, clientRejected(re(503, "invalid_client", "")))
	require.False(t, clientRejected(re(400, "invalid_grant", "")))
	require.True(t, revokedGrant(re(400, "", `{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}`)))
	require.False(t, revokedGrant(re(400, "invalid_request", "")))
	require.False(t, revokedGrant(re(500, "invalid_grant", "")))
	require.False(t, revokedGrant(re(429, "invalid_grant", "")))
	require.False(t, revokedGrant(errors.New("dial tcp: connection refused")))
}

func TestReadCapped(t *testing.T) {
	t.Parallel()
	b, over, err := readCapped(strings.NewReader("hello"), 5)
	require.NoError(t, err)
	require.False(t, over)
	require.Equal(t, "hello", string(b))
	b, over, err = readCapped(strings.NewReader("hello!"), 5)
	require.NoError(t, err)
	require.True(t, over)
	require.Equal(t, "hello", string(b))
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	cat := testCatalog(t, "127.0.0.1:8080")
	base := func() Config {
		return Config{Store: &state.Store{}, Catalog: cat, Redis: nil}
	}
	_, err := New(base())
	require.ErrorContains(t, err, "Redis is required")
	cases := map[string]func(*Config){
		"NoStore":          func(c *Config) { c.Store = nil },
		"NoCatalog":        func(c *Config) { c.Catalog = nil },
		"NegativeConc":     func(c *Config) { c.Concurrency = -1 },
		"HugeConc":         func(c *Config) { c.Concurrency = 1 << 20 },
		"NegativeShutdown": func(c *Config) { c.ShutdownTimeout = -time.Second },
		"BadRatio":         func(c *Config) { c.BreakerFailureRatio = 1.5 },
		"MaxBelowBase":     func(c *Config) { c.RetryBaseDelay, c.RetryMaxDelay = time.Minute, time.Second },
		"HeadroomTooBig":   func(c *Config) { c.RateLimitHeadroom = 1 },
		"ReplaceBuiltin":   func(c *Config) { c.Handlers = map[string]asynqHandler{"connection:validate": nopHandler{}} },
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cfg := base()
			cfg.Redis = redisStub(t)
			mod(&cfg)
			_, err := New(cfg)
			require.Error(t, err)
			require.True(t, strings.HasPrefix(err.Error(), "worker: "), err.Error())
		})
	}
	t.Run("ZeroValuesWork", func(t *testing.T) {
		t.Parallel()
		cfg := base()
		cfg.Redis = redisStub(t)
		w, err := New(cfg)
		require.NoError(t, err)
		require.Equal(t, DefaultConcurrency, w.cfg.Concurrency)
		require.Equal(t, DefaultShutdownTimeout, w.cfg.ShutdownTimeout)
		require.Equal(t, int64(defaultMaxBodyBytes), w.cfg.MaxBodyBytes)
	})
}

type asynqHandler = asynq.Handler

type nopHandler struct{}

func (nopHandler) ProcessTask(context.Context, *asynq.Task) error { return nil }

// redisStub is a client that New never dials.
func redisStub(t *testing.T) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = c.Close() })
	return c
}
