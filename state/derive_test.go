package state

import (
	"reflect"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/vaultfleet/vaultfleet/catalog"
)

var t0 = time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)

// Integrations of each auth type, built directly so the rule is tested
// apart from catalog loading.
var (
	oauthXero = &catalog.Integration{ID: "xero", UnifiedAPI: "accounting", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusLive, Settings: []catalog.Setting{{Name: "tenant_id", Required: true}}}
	oauthHubSpot = &catalog.Integration{ID: "hubspot", UnifiedAPI: "crm", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusLive}
	apiKeyBamboo = &catalog.Integration{ID: "bamboohr", UnifiedAPI: "hris", AuthType: catalog.AuthAPIKey,
		Status: catalog.StatusLive, CredentialFields: []string{"api_key"},
		Settings: []catalog.Setting{{Name: "subdomain", Required: true}}}
	basicZendesk = &catalog.Integration{ID: "zendesk", UnifiedAPI: "ticketing", AuthType: catalog.AuthBasic,
		Status: catalog.StatusLive, CredentialFields: []string{"username", "password"},
		Settings: []catalog.Setting{{Name: "subdomain", Required: true}}}
)

func oauthConn(rev int64) *Connection {
	return &Connection{ID: "accounting+xero", Enabled: true, Revision: rev,
		Credentials: Credentials{AccessToken: "at", RefreshToken: "rt", ExpiresAt: t0.Add(30 * time.Minute)},
		Settings:    map[string]string{"tenant_id": "t-1"}}
}

func apiKeyConn(rev int64) *Connection {
	return &Connection{ID: "hris+bamboohr", Enabled: true, Revision: rev,
		Credentials: Credentials{APIKey: "k"}, Settings: map[string]string{"subdomain": "acme"}}
}

func basicConn(rev int64) *Connection {
	return &Connection{ID: "ticketing+zendesk", Enabled: true, Revision: rev,
		Credentials: Credentials{Username: "u@x/token", Password: "p"}, Settings: map[string]string{"subdomain": "acme"}}
}

func verdict(o Outcome, reason string, rev int64) *Verdict {
	return &Verdict{Outcome: o, Reason: reason, CheckedAt: t0, Revision: rev}
}

func with(c *Connection, f func(*Connection)) *Connection { f(c); return c }

// TestDeriveTable covers every row of DESIGN.md's state table for every
// auth type it applies to, and the health values within each state.
func TestDeriveTable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		desc       string
		row        int
		in         *catalog.Integration
		conn       *Connection
		wantState  State
		wantHealth Health
	}{
		// Row 1: no record.
		{"Row1OAuthNoRecord", 1, oauthXero, nil, Available, HealthOK},
		{"Row1APIKeyNoRecord", 1, apiKeyBamboo, nil, Available, HealthOK},
		{"Row1BasicNoRecord", 1, basicZendesk, nil, Available, HealthOK},

		// Row 2: added, credentials missing.
		{"Row2OAuthNoToken", 2, oauthXero, with(oauthConn(1), func(c *Connection) { c.Credentials = Credentials{} }), Added, HealthNeedsAuth},
		{"Row2APIKeyEmpty", 2, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) { c.Credentials.APIKey = "" }), Added, HealthNeedsAuth},
		{"Row2BasicPasswordEmpty", 2, basicZendesk, with(basicConn(1), func(c *Connection) { c.Credentials.Password = "" }), Added, HealthNeedsAuth},
		{"Row2BeatsInvalidVerdict", 2, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) {
			c.Credentials.APIKey = ""
			c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 1)
		}), Added, HealthNeedsAuth},

		// Row 3: OAuth, tokens, required setting missing.
		{"Row3XeroNoTenant", 3, oauthXero, with(oauthConn(1), func(c *Connection) { c.Settings = nil }), Authorized, HealthMissingSettings},
		{"Row3RefreshTokenOnly", 3, oauthXero, with(oauthConn(1), func(c *Connection) {
			c.Settings = nil
			c.Credentials.AccessToken = ""
		}), Authorized, HealthMissingSettings},
		{"Row3BeatsInvalidVerdict", 3, oauthXero, with(oauthConn(1), func(c *Connection) {
			c.Settings = nil
			c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 1)
		}), Authorized, HealthMissingSettings},
		// The non-OAuth counterpart of a missing setting stays added.
		{"Row3NonOAuthMissingSettingIsAdded", 3, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) { c.Settings = nil }), Added, HealthMissingSettings},

		// Row 4: latest verdict for the current credentials is invalid.
		{"Row4OAuthRejected", 4, oauthXero, with(oauthConn(2), func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 2) }), Invalid, HealthNeedsAuth},
		{"Row4OAuthRevoked", 4, oauthHubSpot, with(oauthConn(2), func(c *Connection) {
			c.Verdict = verdict(OutcomeInvalid, ReasonRefreshTokenRevoked, 2)
		}), Invalid, HealthRevoked},
		{"Row4APIKeyRejected", 4, apiKeyBamboo, with(apiKeyConn(3), func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 3) }), Invalid, HealthNeedsAuth},
		{"Row4BasicAssertionFailed", 4, basicZendesk, with(basicConn(1), func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonAssertionFailed, 1) }), Invalid, HealthNeedsAuth},
		{"Row4Misconfigured", 4, basicZendesk, with(basicConn(1), func(c *Connection) {
			c.Verdict = verdict(OutcomeInvalid, ReasonMisconfiguredAccount, 1)
		}), Invalid, HealthMisconfigured},
		{"Row4OldMisconfiguredIgnored", 5, basicZendesk, with(basicConn(2), func(c *Connection) {
			c.Verdict = verdict(OutcomeInvalid, ReasonMisconfiguredAccount, 1)
		}), Added, HealthOK},
		{"Row4DisabledKeepsState", 4, apiKeyBamboo, with(apiKeyConn(3), func(c *Connection) {
			c.Enabled = false
			c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 3)
		}), Invalid, HealthNeedsAuth},

		// Row 5: non-OAuth, credentials entered, no verdict for them yet.
		{"Row5APIKeyPending", 5, apiKeyBamboo, apiKeyConn(1), Added, HealthOK},
		{"Row5BasicPending", 5, basicZendesk, basicConn(1), Added, HealthOK},
		{"Row5OldInvalidVerdictIgnored", 5, apiKeyBamboo, with(apiKeyConn(2), func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 1) }), Added, HealthOK},
		{"Row5OldValidVerdictIgnored", 5, basicZendesk, with(basicConn(2), func(c *Connection) { c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1) }), Added, HealthOK},
		{"Row5PendingDegraded", 5, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) { c.Transient.Failures = 3 }), Added, HealthDegraded},
		{"Row5PendingMisconfigured", 5, basicZendesk, with(basicConn(1), func(c *Connection) {
			c.Transient = Transient{Failures: 2, Misconfigured: true}
		}), Added, HealthMisconfigured},
		{"Row5PendingConfirmation", 5, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) {
			c.Confirmation = Confirmation{Invalids: 1, Revision: 1}
		}), Added, HealthPendingConfirmation},

		// Row 6: callable.
		{"Row6APIKeyValid", 6, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) { c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1) }), Callable, HealthOK},
		{"Row6BasicValid", 6, basicZendesk, with(basicConn(4), func(c *Connection) { c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 4) }), Callable, HealthOK},
		{"Row6OAuthNoVerdict", 6, oauthXero, oauthConn(1), Callable, HealthOK},
		{"Row6OAuthValid", 6, oauthHubSpot, with(oauthConn(1), func(c *Connection) { c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1) }), Callable, HealthOK},
		{"Row6OAuthOldInvalidIgnored", 6, oauthHubSpot, with(oauthConn(2), func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 1) }), Callable, HealthOK},
		{"Row6OAuthTokenExpired", 6, oauthHubSpot, with(oauthConn(1), func(c *Connection) { c.Credentials.ExpiresAt = t0.Add(-time.Minute) }), Callable, HealthPendingRefresh},
		{"Row6OAuthTokenNearExpiry", 6, oauthHubSpot, with(oauthConn(1), func(c *Connection) { c.Credentials.ExpiresAt = t0.Add(30 * time.Second) }), Callable, HealthPendingRefresh},
		{"Row6OAuthRefreshFailing", 6, oauthHubSpot, with(oauthConn(1), func(c *Connection) { c.Refresh.Failures = 2 }), Callable, HealthPendingRefresh},
		{"Row6Degraded", 6, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) {
			c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1)
			c.Transient.Failures = 4
		}), Callable, HealthDegraded},
		{"Row6Misconfigured", 6, apiKeyBamboo, with(apiKeyConn(1), func(c *Connection) {
			c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1)
			c.Transient = Transient{Failures: 1, Misconfigured: true}
		}), Callable, HealthMisconfigured},
		{"Row6PendingConfirmation", 6, oauthXero, with(oauthConn(1), func(c *Connection) {
			c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 1)
			c.Confirmation = Confirmation{Invalids: 1, Revision: 1}
		}), Callable, HealthPendingConfirmation},
		{"Row6OldConfirmationIgnored", 6, oauthXero, with(oauthConn(2), func(c *Connection) {
			c.Confirmation = Confirmation{Invalids: 1, Revision: 1}
		}), Callable, HealthOK},
	}
	rows := map[int]bool{}
	for _, tc := range tests {
		rows[tc.row] = true
		t.Run(tc.desc, func(t *testing.T) {
			gotState, gotHealth := Derive(tc.conn, tc.in, t0)
			require.Equal(t, tc.wantState, gotState, "state")
			require.Equal(t, tc.wantHealth, gotHealth, "health")
		})
	}
	for row := 1; row <= 6; row++ {
		require.True(t, rows[row], "row %d of the state table has no case", row)
	}
}

// genConnection draws an arbitrary connection for one of the test
// integrations: any mix of credentials, settings, verdicts and revisions.
func genConnection(t *rapid.T) (*Connection, *catalog.Integration) {
	in := rapid.SampledFrom([]*catalog.Integration{oauthXero, oauthHubSpot, apiKeyBamboo, basicZendesk}).Draw(t, "integration")
	if rapid.IntRange(0, 9).Draw(t, "nil") == 0 {
		return nil, in
	}
	str := func(label string) string { return rapid.SampledFrom([]string{"", "x", "secret"}).Draw(t, label) }
	c := &Connection{
		ID:       ConnectionID(in.UnifiedAPI, in.ID),
		Enabled:  rapid.Bool().Draw(t, "enabled"),
		Revision: rapid.Int64Range(0, 5).Draw(t, "revision"),
		Credentials: Credentials{
			AccessToken: str("access"), RefreshToken: str("refresh"), APIKey: str("apikey"),
			Username: str("username"), Password: str("password"),
		},
		Settings: map[string]string{"tenant_id": str("tenant"), "subdomain": str("subdomain")},
	}
	if rapid.Bool().Draw(t, "expires") {
		c.Credentials.ExpiresAt = t0.Add(time.Duration(rapid.IntRange(-7200, 7200).Draw(t, "expiresIn")) * time.Second)
	}
	if rapid.Bool().Draw(t, "hasVerdict") {
		c.Verdict = &Verdict{
			Outcome: rapid.SampledFrom([]Outcome{OutcomeValid, OutcomeInvalid}).Draw(t, "outcome"),
			Reason: rapid.SampledFrom([]string{ReasonCheckPassed, ReasonCredentialsRejected, ReasonRefreshTokenRevoked,
				ReasonMisconfiguredAccount}).Draw(t, "reason"),
			Revision: rapid.Int64Range(0, 5).Draw(t, "verdictRevision"),
		}
	}
	c.Transient.Failures = rapid.IntRange(0, 3).Draw(t, "transient")
	c.Transient.Misconfigured = rapid.Bool().Draw(t, "misconfigured")
	c.Refresh.Failures = rapid.IntRange(0, 3).Draw(t, "refreshFailures")
	c.Confirmation = Confirmation{Invalids: rapid.IntRange(0, 2).Draw(t, "invalids"), Revision: rapid.Int64Range(0, 5).Draw(t, "confirmRevision")}
	return c, in
}

func clone(c *Connection) *Connection {
	if c == nil {
		return nil
	}
	d := *c
	d.Settings = map[string]string{}
	for k, v := range c.Settings {
		d.Settings[k] = v
	}
	if c.Verdict != nil {
		v := *c.Verdict
		d.Verdict = &v
	}
	return &d
}

// TestDeriveProperties: Derive is total (every input yields a known state
// and health, no panic), deterministic, does not modify its input, and a
// verdict for an older credentials revision never decides the state.
func TestDeriveProperties(t *testing.T) {
	t.Parallel()
	validStates := map[State]bool{}
	for _, s := range States() {
		validStates[s] = true
	}
	validHealth := map[Health]bool{}
	for _, h := range Healths() {
		validHealth[h] = true
	}
	rapid.Check(t, func(t *rapid.T) {
		c, in := genConnection(t)
		before := clone(c)
		s1, h1 := Derive(c, in, t0)
		s2, h2 := Derive(c, in, t0)
		if !validStates[s1] || !validHealth[h1] {
			t.Fatalf("Derive returned unknown state %q / health %q", s1, h1)
		}
		if s1 != s2 || h1 != h2 {
			t.Fatalf("Derive not deterministic: %s/%s then %s/%s", s1, h1, s2, h2)
		}
		if !reflect.DeepEqual(before, c) {
			t.Fatalf("Derive modified its input")
		}
		if c == nil {
			if s1 != Available {
				t.Fatalf("no record must be available, got %s", s1)
			}
			return
		}
		if s1 == Available {
			t.Fatalf("a stored connection is never available")
		}
		// A verdict for another revision decides nothing: the state equals
		// the state with no verdict at all.
		if c.Verdict != nil && c.Verdict.Revision != c.Revision {
			bare := clone(c)
			bare.Verdict = nil
			sb, _ := Derive(bare, in, t0)
			if sb != s1 {
				t.Fatalf("verdict of revision %d decided the state at revision %d: %s with it, %s without",
					c.Verdict.Revision, c.Revision, s1, sb)
			}
		}
		// Only a current invalid verdict makes a connection invalid.
		if s1 == Invalid && (c.Verdict == nil || c.Verdict.Revision != c.Revision || c.Verdict.Outcome != OutcomeInvalid) {
			t.Fatalf("invalid without a current invalid verdict")
		}
		// A non-OAuth connection is callable only on a current valid verdict.
		if s1 == Callable && in.AuthType != catalog.AuthOAuth2 &&
			(c.Verdict == nil || c.Verdict.Revision != c.Revision || c.Verdict.Outcome != OutcomeValid) {
			t.Fatalf("non-OAuth callable without a current valid verdict")
		}
		// Misconfigured is the consumer's own doing: a current verdict
		// saying so, or the latest failed check; never anything else.
		if h1 == HealthMisconfigured {
			byVerdict := s1 == Invalid && c.Verdict.Reason == ReasonMisconfiguredAccount
			byCheck := s1 != Invalid && c.Transient.Failures > 0 && c.Transient.Misconfigured
			if !byVerdict && !byCheck {
				t.Fatalf("misconfigured without a misconfigured verdict or check: %+v", c)
			}
		}
		if s1 != Invalid && h1 == HealthDegraded && c.Transient.Misconfigured {
			t.Fatalf("a misconfigured check shown as provider trouble")
		}
		// Enabled is separate from state.
		flipped := clone(c)
		flipped.Enabled = !c.Enabled
		if sf, hf := Derive(flipped, in, t0); sf != s1 || hf != h1 {
			t.Fatalf("enabled changed the state: %s/%s vs %s/%s", s1, h1, sf, hf)
		}
	})
}

func TestCredentialsSetGet(t *testing.T) {
	t.Parallel()
	var c Credentials
	for _, f := range []string{"access_token", "refresh_token", "api_key", "username", "password", "company_id"} {
		require.NoError(t, c.Set(f, "v-"+f))
		require.Equal(t, "v-"+f, c.Get(f))
	}
	require.NoError(t, c.Set("expires_at", "2026-11-27T12:00:00Z"))
	require.True(t, c.ExpiresAt.Equal(t0))
	require.Equal(t, "2026-11-27T12:00:00Z", c.Get("expires_at"))
	err := c.Set("expires_at", "tomorrow")
	var fe *FieldError
	require.ErrorAs(t, err, &fe)
	require.NotContains(t, err.Error(), "tomorrow", "errors never echo credential values")
	require.Equal(t, []string{"access_token", "api_key", "company_id", "expires_at", "password", "refresh_token", "username"}, c.Fields())
	d := c
	require.True(t, c.Equal(d))
	d.Password = "other"
	require.False(t, c.Equal(d))
	require.NoError(t, c.Set("company_id", ""))
	require.Empty(t, c.Get("company_id"))
}

func TestTokenExpired(t *testing.T) {
	t.Parallel()
	tests := []struct {
		desc string
		c    Credentials
		want bool
	}{
		{"NoAccessToken", Credentials{RefreshToken: "r"}, true},
		{"NoExpiry", Credentials{AccessToken: "a"}, false},
		{"Future", Credentials{AccessToken: "a", ExpiresAt: t0.Add(time.Hour)}, false},
		{"WithinSkew", Credentials{AccessToken: "a", ExpiresAt: t0.Add(ExpirySkew - time.Second)}, true},
		{"Past", Credentials{AccessToken: "a", ExpiresAt: t0.Add(-time.Second)}, true},
	}
	for _, tc := range tests {
		t.Run(tc.desc, func(t *testing.T) {
			require.Equal(t, tc.want, TokenExpired(tc.c, t0))
		})
	}
}
