package state

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Integrations the policy tables use beside derive_test.go's.
var (
	oauthClientCreds = &catalog.Integration{ID: "acme", UnifiedAPI: "crm", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusLive, CredentialFields: []string{"client_id", "client_secret"},
		OAuth: &catalog.OAuth{GrantType: catalog.GrantClientCredentials}}
	oauthSmallWindow = &catalog.Integration{ID: "hubspot", UnifiedAPI: "crm", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusLive, RefreshWindow: catalog.Duration(20 * time.Second)}
	oauthConfirming = &catalog.Integration{ID: "xero", UnifiedAPI: "accounting", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusLive, Settings: []catalog.Setting{{Name: "tenant_id", Required: true}},
		ConfirmInvalid: 2, ConfirmSpacing: catalog.Duration(2 * time.Minute)}
	oauthDevelopment = &catalog.Integration{ID: "hubspot", UnifiedAPI: "crm", AuthType: catalog.AuthOAuth2,
		Status: catalog.StatusDevelopment}
)

// TestPolicyRefresh pins when a token is refreshed, for every auth type
// and short, long, unknown and past lifetimes.
func TestPolicyRefresh(t *testing.T) {
	t.Parallel()
	creds := func(rt string, lifetime, age time.Duration) Credentials {
		c := Credentials{AccessToken: "at", RefreshToken: rt, IssuedAt: t0.Add(-age)}
		if lifetime > 0 {
			c.ExpiresAt = c.IssuedAt.Add(lifetime)
		}
		return c
	}
	tests := map[string]struct {
		in     *catalog.Integration
		c      Credentials
		window time.Duration // RefreshWindow
		due    bool          // RefreshDue at t0
	}{
		"OAuthShortFresh":  {oauthHubSpot, creds("rt", time.Minute, 0), 12 * time.Second, false},
		"OAuthShortNear":   {oauthHubSpot, creds("rt", time.Minute, 50*time.Second), 12 * time.Second, true},
		"OAuthLongFresh":   {oauthHubSpot, creds("rt", 24*time.Hour, time.Hour), 10 * time.Minute, false},
		"OAuthLongNear":    {oauthHubSpot, creds("rt", 24*time.Hour, 24*time.Hour-9*time.Minute), 10 * time.Minute, true},
		"OAuthHourAt49m":   {oauthHubSpot, creds("rt", time.Hour, 49*time.Minute), 10 * time.Minute, false},
		"OAuthExpired":     {oauthHubSpot, creds("rt", time.Hour, 2*time.Hour), 10 * time.Minute, true},
		"OAuthNoExpiry":    {oauthHubSpot, creds("rt", 0, 0), 10 * time.Minute, false},
		"OAuthNoRefresh":   {oauthHubSpot, creds("", time.Hour, 2*time.Hour), 10 * time.Minute, false},
		"OAuthNoAccess":    {oauthHubSpot, Credentials{RefreshToken: "rt"}, 10 * time.Minute, true},
		"ClientCredsNear":  {oauthClientCreds, creds("", time.Hour, 55*time.Minute), 10 * time.Minute, true},
		"ClientCredsFresh": {oauthClientCreds, creds("", time.Hour, time.Minute), 10 * time.Minute, false},
		// A catalog window shorter than the expiry skew: the token is
		// refreshed once it counts as expired, never later.
		"SmallWindowAtSkew": {oauthSmallWindow, creds("rt", time.Hour, 59*time.Minute+10*time.Second), time.Minute, true},
		"SmallWindowBefore": {oauthSmallWindow, creds("rt", time.Hour, 58*time.Minute), time.Minute, false},
		"APIKey":            {apiKeyBamboo, Credentials{APIKey: "k"}, 10 * time.Minute, false},
		"Basic":             {basicZendesk, Credentials{Username: "u", Password: "p"}, 10 * time.Minute, false},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			require.Equal(t, tc.window, RefreshWindow(tc.c, tc.in), "window")
			require.Equal(t, tc.due, RefreshDue(tc.c, tc.in, t0), "due")
			if !tc.c.ExpiresAt.IsZero() {
				require.Equal(t, tc.c.ExpiresAt.Add(-tc.window), RefreshAt(tc.c, tc.in))
			}
		})
	}
}

// TestPolicyExpiredIsDue: a token that can be refreshed and counts as
// expired is always due for refresh, whatever its lifetime and the
// catalog's window: one window, no expired token left waiting.
func TestPolicyExpiredIsDue(t *testing.T) {
	t.Parallel()
	rapid.Check(t, func(t *rapid.T) {
		lifetime := time.Duration(rapid.Int64Range(int64(time.Second), int64(48*time.Hour)).Draw(t, "lifetime"))
		age := time.Duration(rapid.Int64Range(0, int64(50*time.Hour)).Draw(t, "age"))
		window := time.Duration(rapid.Int64Range(0, int64(time.Hour)).Draw(t, "window"))
		in := &catalog.Integration{ID: "x", AuthType: catalog.AuthOAuth2, Status: catalog.StatusLive,
			RefreshWindow: catalog.Duration(window)}
		c := Credentials{AccessToken: "at", RefreshToken: "rt", IssuedAt: t0, ExpiresAt: t0.Add(lifetime)}
		now := t0.Add(age)
		if TokenExpired(c, now) && !RefreshDue(c, in, now) {
			t.Fatalf("expired at %v but not due (refresh at %v)", now, RefreshAt(c, in))
		}
	})
}

func TestPolicyJitter(t *testing.T) {
	t.Parallel()
	a := Ref{ConsumerID: "c1", ConnectionID: "crm+hubspot"}
	require.Equal(t, Jitter(a, time.Hour, 0.1), Jitter(a, time.Hour, 0.1), "fixed per connection")
	require.Equal(t, time.Hour, Jitter(a, time.Hour, 0), "no spread")
	require.Equal(t, time.Hour, Jitter(a, time.Hour, -1), "negative spread")
	require.Equal(t, time.Duration(0), Jitter(a, 0, 0.1))
	seen := map[time.Duration]bool{}
	lo, hi := 0, 0
	for i := range 1000 {
		r := Ref{ConsumerID: "c" + string(rune('a'+i%26)) + string(rune('a'+i/26)), ConnectionID: "crm+hubspot"}
		d := Jitter(r, time.Hour, 0.1)
		require.GreaterOrEqual(t, d, 54*time.Minute)
		require.Less(t, d, 66*time.Minute)
		seen[d] = true
		if d < time.Hour {
			lo++
		} else {
			hi++
		}
		// A spread above 0.5 is clamped.
		require.GreaterOrEqual(t, Jitter(r, time.Hour, 0.9), 30*time.Minute)
	}
	require.Greater(t, len(seen), 990, "connections spread")
	require.Greater(t, lo, 400, "below the interval")
	require.Greater(t, hi, 400, "above the interval")
}

// TestPolicyDueCheck pins the check index entry of every kind of write.
func TestPolicyDueCheck(t *testing.T) {
	t.Parallel()
	jit := func(c *Connection, d time.Duration) time.Time {
		return t0.Add(Jitter(Ref{ConsumerID: c.ConsumerID, ConnectionID: c.ID}, d, DefaultJitter))
	}
	mk := func(base *Connection, in *catalog.Integration, f func(*Connection)) *Connection {
		c := base.clone()
		c.ConsumerID = "c1"
		if f != nil {
			f(c)
		}
		c.State, c.Health = Derive(c, in, t0)
		return c
	}
	valid := func(c *Connection) { c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, c.Revision) }
	invalid := func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, c.Revision) }
	callableKey := mk(apiKeyConn(1), apiKeyBamboo, valid)
	tests := map[string]struct {
		in         *catalog.Integration
		cur, next  *Connection
		h          hints
		mode       string
		at         time.Time
		wantAtZero bool
	}{
		"CreatedAPIKey": {in: apiKeyBamboo, next: mk(apiKeyConn(1), apiKeyBamboo, nil), h: hints{consumer: true},
			mode: dueSet, at: t0.Add(safetyNet)},
		"CreatedBasic": {in: basicZendesk, next: mk(basicConn(1), basicZendesk, nil), h: hints{consumer: true},
			mode: dueSet, at: t0.Add(safetyNet)},
		"CreatedOAuth": {in: oauthXero, next: mk(oauthConn(1), oauthXero, nil), h: hints{consumer: true},
			mode: dueSet, at: t0.Add(safetyNet)},
		"NoCredentials": {in: apiKeyBamboo, next: mk(apiKeyConn(1), apiKeyBamboo, func(c *Connection) { c.Credentials = Credentials{} }),
			mode: dueRemove},
		"MissingSettingOAuth": {in: oauthXero, next: mk(oauthConn(1), oauthXero, func(c *Connection) { c.Settings = nil }),
			mode: dueRemove},
		"Disabled": {in: apiKeyBamboo, cur: callableKey, next: mk(apiKeyConn(1), apiKeyBamboo, func(c *Connection) { valid(c); c.Enabled = false }),
			mode: dueRemove},
		"NotCheckable":  {in: oauthDevelopment, next: mk(oauthConn(1), oauthDevelopment, nil), mode: dueRemove},
		"NoIntegration": {next: callableKey, mode: dueRemove},
		"Reenabled": {in: apiKeyBamboo, cur: mk(apiKeyConn(1), apiKeyBamboo, func(c *Connection) { valid(c); c.Enabled = false }),
			next: callableKey, h: hints{consumer: true}, mode: dueSet, at: t0.Add(safetyNet)},
		"NewRevision": {in: apiKeyBamboo, cur: callableKey, next: mk(apiKeyConn(2), apiKeyBamboo, nil), h: hints{consumer: true},
			mode: dueSet, at: t0.Add(safetyNet)},
		// The verdict on a new revision ends its safety net even when the
		// state stays callable (an OAuth re-authorization): no second
		// check 30 s later.
		"VerdictSameState": {in: oauthXero, cur: mk(oauthConn(2), oauthXero, nil), next: mk(oauthConn(2), oauthXero, valid),
			h: hints{verdict: true}, mode: dueSet, at: jit(mk(oauthConn(2), oauthXero, nil), catalog.DefaultCallableEvery)},
		"VerdictInvalid": {in: apiKeyBamboo, cur: callableKey, next: mk(apiKeyConn(1), apiKeyBamboo, invalid),
			h: hints{verdict: true}, mode: dueSet, at: jit(callableKey, catalog.DefaultInvalidEvery)},
		"ConfirmStep": {in: oauthConfirming, cur: mk(oauthConn(1), oauthConfirming, valid), next: mk(oauthConn(1), oauthConfirming, valid),
			h: hints{verdict: true, confirm: true}, mode: dueSet, at: t0.Add(2*time.Minute + confirmGrace)},
		"OtherWrite": {in: apiKeyBamboo, cur: callableKey, next: callableKey, h: hints{reason: "boom"},
			mode: dueIfNone, at: jit(callableKey, catalog.DefaultCallableEvery)},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			mode, at := dueCheck(tc.cur, tc.next, tc.in, tc.h, t0)
			require.Equal(t, tc.mode, mode)
			if tc.mode != dueRemove {
				require.Equal(t, tc.at, at)
			}
		})
	}
}

func TestPolicyDueRefresh(t *testing.T) {
	t.Parallel()
	c := oauthConn(1)
	c.ConsumerID = "c1"
	c.State, c.Health = Derive(c, oauthXero, t0)
	at := RefreshAt(c.Credentials, oauthXero)
	later := c.clone()
	later.Credentials.ExpiresAt = later.Credentials.ExpiresAt.Add(time.Hour)
	noRT := c.clone()
	noRT.Credentials.RefreshToken = ""
	revoked := c.clone()
	revoked.Health = HealthRevoked
	tests := map[string]struct {
		cur, next *Connection
		in        *catalog.Integration
		mode      string
		at        time.Time
	}{
		"New":          {nil, c, oauthXero, dueSet, at},
		"SameExpiry":   {c, c, oauthXero, dueIfNone, at},
		"NewExpiry":    {c, later, oauthXero, dueSet, RefreshAt(later.Credentials, oauthXero)},
		"NoRefresh":    {c, noRT, oauthXero, dueRemove, time.Time{}},
		"Revoked":      {c, revoked, oauthXero, dueRemove, time.Time{}},
		"NotCheckable": {nil, c, oauthDevelopment, dueRemove, time.Time{}},
		"APIKey":       {nil, apiKeyConn(1), apiKeyBamboo, dueRemove, time.Time{}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			mode, at := dueRefresh(tc.cur, tc.next, tc.in)
			require.Equal(t, tc.mode, mode)
			require.Equal(t, tc.at, at)
		})
	}
}

// TestPolicyTasks pins the task, queue and id of every caller.
func TestPolicyTasks(t *testing.T) {
	t.Parallel()
	ref := Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	conn := func(f func(*Connection)) *Connection {
		c := oauthConn(7)
		c.ConsumerID, c.Version = "c1", 9
		if f != nil {
			f(c)
		}
		c.State, c.Health = Derive(c, oauthConfirming, t0)
		return c
	}
	due := t0.Add(-time.Second)
	claim := Claim{Ref: ref, Due: due, ServiceID: "xero", State: Callable}
	late := Claim{Ref: ref, Due: t0.Add(-11 * time.Minute), ServiceID: "xero", State: Callable}
	confirming := conn(func(c *Connection) {
		c.Verdict = verdict(OutcomeValid, ReasonCheckPassed, 7)
		c.Confirmation = Confirmation{Revision: 7, Invalids: 1}
	})
	type want struct {
		typ    string
		reason tasks.Reason
		key    string
		queue  string
		delay  time.Duration
	}
	valID := func(key string) string { return tasks.TaskID(tasks.TypeValidate, "c1", ref.ConnectionID, key) }
	tests := map[string]struct {
		got   func() []Task
		want  []want
		wantI []string
	}{
		"SweepCheck": {got: func() []Task { t, _ := SweepTask(IndexCheck, claim, oauthConfirming, t0); return []Task{t} },
			want: []want{{tasks.TypeValidate, tasks.ReasonScheduled, "1795780799", tasks.QueueLow, 0}}, wantI: []string{valID("1795780799")}},
		"SweepRefresh": {got: func() []Task { t, _ := SweepTask(IndexRefresh, claim, oauthConfirming, t0); return []Task{t} },
			want:  []want{{tasks.TypeRefreshToken, tasks.ReasonScheduled, "1795780799", tasks.QueueCritical, 0}},
			wantI: []string{tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		"SweepRefreshExpired": {got: func() []Task { t, _ := SweepTask(IndexRefresh, late, oauthConfirming, t0); return []Task{t} },
			want:  []want{{tasks.TypeRefreshToken, tasks.ReasonExpired, "1795780140", tasks.QueueCritical, 0}},
			wantI: []string{tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		"SweepNotCheckable": {got: func() []Task {
			_, ok := SweepTask(IndexCheck, claim, oauthDevelopment, t0)
			_, ok2 := SweepTask(IndexCheck, claim, nil, t0)
			require.False(t, ok || ok2)
			return nil
		}},
		"Created": {got: func() []Task { return TasksAfterWrite(nil, conn(nil), oauthConfirming, t0) },
			want: []want{{tasks.TypeValidate, tasks.ReasonCredentialsChanged, "rev7", tasks.QueueCritical, 0}}, wantI: []string{valID("rev7")}},
		"CreatedExpired": {got: func() []Task {
			return TasksAfterWrite(nil, conn(func(c *Connection) { c.Credentials.ExpiresAt = t0.Add(-time.Minute) }), oauthConfirming, t0)
		}, want: []want{{tasks.TypeValidate, tasks.ReasonCredentialsChanged, "rev7", tasks.QueueCritical, 0},
			{tasks.TypeRefreshToken, tasks.ReasonExpired, "1795780740", tasks.QueueCritical, 0}},
			wantI: []string{valID("rev7"), tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		// Nearly expired (inside the refresh window) is refreshed at once too.
		"ReauthorizedNearExpiry": {got: func() []Task {
			return TasksAfterWrite(conn(func(c *Connection) { c.Revision = 6 }),
				conn(func(c *Connection) { c.Credentials.ExpiresAt = t0.Add(5 * time.Minute) }), oauthConfirming, t0)
		}, want: []want{{tasks.TypeValidate, tasks.ReasonCredentialsChanged, "rev7", tasks.QueueCritical, 0},
			{tasks.TypeRefreshToken, tasks.ReasonExpired, "1795781100", tasks.QueueCritical, 0}},
			wantI: []string{valID("rev7"), tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		"Enabled": {got: func() []Task {
			return TasksAfterWrite(conn(func(c *Connection) { c.Enabled = false }), conn(nil), oauthConfirming, t0)
		}, want: []want{{tasks.TypeValidate, tasks.ReasonEnabled, "en9", tasks.QueueCritical, 0}}, wantI: []string{valID("en9")}},
		"Disabled": {got: func() []Task {
			return TasksAfterWrite(conn(nil), conn(func(c *Connection) { c.Enabled = false }), oauthConfirming, t0)
		}},
		"Verdict":      {got: func() []Task { return TasksAfterWrite(conn(nil), confirming, oauthConfirming, t0) }},
		"Deleted":      {got: func() []Task { return TasksAfterWrite(conn(nil), nil, oauthConfirming, t0) }},
		"NotCheckable": {got: func() []Task { return TasksAfterWrite(nil, conn(nil), oauthDevelopment, t0) }},
		"NoCredentials": {got: func() []Task {
			return TasksAfterWrite(nil, conn(func(c *Connection) { c.Credentials = Credentials{} }), oauthConfirming, t0)
		}},
		"OnDemandValidate": {got: func() []Task { return []Task{OnDemandTask(conn(nil), tasks.TypeValidate)} },
			want: []want{{tasks.TypeValidate, tasks.ReasonOnDemand, "od9", tasks.QueueCritical, 0}}, wantI: []string{valID("od9")}},
		"OnDemandRefresh": {got: func() []Task { return []Task{OnDemandTask(conn(nil), tasks.TypeRefreshToken)} },
			want:  []want{{tasks.TypeRefreshToken, tasks.ReasonOnDemand, "1795782600", tasks.QueueCritical, 0}},
			wantI: []string{tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		"OnDemandRefreshNoExpiry": {got: func() []Task {
			return []Task{OnDemandTask(conn(func(c *Connection) { c.Credentials.ExpiresAt = time.Time{} }), tasks.TypeRefreshToken)}
		}, want: []want{{tasks.TypeRefreshToken, tasks.ReasonOnDemand, "0", tasks.QueueCritical, 0}},
			wantI: []string{tasks.RefreshTaskID("c1", ref.ConnectionID)}},
		"Credentials": {got: func() []Task { return []Task{CredentialsTask(conn(nil))} },
			want: []want{{tasks.TypeValidate, tasks.ReasonCredentialsChanged, "rev7", tasks.QueueCritical, 0}}, wantI: []string{valID("rev7")}},
		"ConfirmStep1": {got: func() []Task { t, _ := ConfirmTask(confirming, oauthConfirming, 7); return []Task{t} },
			want:  []want{{tasks.TypeValidate, tasks.ReasonConfirm, "confirm-7-1", tasks.QueueDefault, 2 * time.Minute}},
			wantI: []string{valID("confirm-7-1")}},
		"ConfirmNone": {got: func() []Task {
			for name, c := range map[string]*Connection{
				"OtherRevision": confirming, "NoConfirmation": conn(nil),
				"Invalid": conn(func(c *Connection) { c.Verdict = verdict(OutcomeInvalid, ReasonCredentialsRejected, 7) }),
			} {
				rev := int64(7)
				if name == "OtherRevision" {
					rev = 8
				}
				_, ok := ConfirmTask(c, oauthConfirming, rev)
				require.False(t, ok, name)
			}
			_, ok := ConfirmTask(confirming, oauthXero, 7) // confirm_invalid 0
			require.False(t, ok, "no confirmation asked")
			return nil
		}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := tc.got()
			require.Len(t, got, len(tc.want))
			for i, w := range tc.want {
				g := got[i]
				require.Equal(t, ref, g.Ref)
				require.Equal(t, w, want{g.Type, g.Reason, g.Key, g.Queue(), g.Delay})
				require.Equal(t, tc.wantI[i], g.ID())
				at, opts, err := g.New()
				require.NoError(t, err)
				require.Equal(t, w.typ, at.Type())
				require.Len(t, opts, map[bool]int{true: 1}[w.delay > 0])
				p, err := tasks.ParseConnectionPayload(at.Payload())
				require.NoError(t, err)
				require.Equal(t, w.reason, p.Reason)
				require.Equal(t, w.key, p.Key)
			}
		})
	}
}

func TestPolicySweepNextCheck(t *testing.T) {
	t.Parallel()
	ref := Ref{ConsumerID: "c1", ConnectionID: "accounting+xero"}
	cl := Claim{Ref: ref, State: Invalid}
	require.Equal(t, t0.Add(Jitter(ref, catalog.DefaultInvalidEvery, 0.2)), SweepNextCheck(cl, oauthXero, t0, 0.2))
	require.Equal(t, t0.Add(Jitter(ref, DefaultCheckInterval, 0.2)), SweepNextCheck(cl, oauthDevelopment, t0, 0.2))
	require.Equal(t, t0.Add(DefaultCheckInterval), SweepNextCheck(cl, nil, t0, 0))
}
