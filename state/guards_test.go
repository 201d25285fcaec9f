package state

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestWouldInvalidate: only a verdict that turns a connection invalid,
// after the integration's confirmation, counts as a flip; WouldInvalidate
// agrees with what ApplyVerdict then does, step by step.
func TestWouldInvalidate(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	rejected := func(rev int64) Verdict {
		return Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401, Revision: rev}
	}

	t.Run("NoConfirmation", func(t *testing.T) {
		ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
		require.NoError(t, err)
		c, in := ch.After, mustIntegration(t, b.store, refBamboo)
		require.True(t, WouldInvalidate(c, in, rejected(c.Revision), storeT0), "added to invalid is a flip")
		require.True(t, WouldInvalidate(c, in, Verdict{Outcome: OutcomeInvalid}, storeT0), "revision 0 means the connection's")
		require.False(t, WouldInvalidate(c, in, rejected(c.Revision-1), storeT0), "another revision decides nothing")
		require.False(t, WouldInvalidate(c, in, Verdict{Outcome: OutcomeValid, Revision: c.Revision}, storeT0))
		require.False(t, WouldInvalidate(nil, in, rejected(1), storeT0))

		ch, err = b.store.ApplyVerdictFrom(ctx, c, rejected(c.Revision))
		require.NoError(t, err)
		require.Equal(t, Invalid, ch.After.State)
		require.False(t, WouldInvalidate(ch.After, in, rejected(c.Revision), storeT0), "already invalid: no flip")
	})
	t.Run("WithConfirmation", func(t *testing.T) {
		in := mustIntegration(t, b.store, refXero) // confirm_invalid: 1
		ch, err := b.store.Put(ctx, refXero, Input{Credentials: map[string]string{"access_token": "at", "refresh_token": "rt",
			"expires_at": storeT0.Add(30 * time.Minute).Format(time.RFC3339)},
			Settings: map[string]string{"tenant_id": "t-1"}}, 0)
		require.NoError(t, err)
		c := ch.After
		require.Equal(t, Callable, c.State)
		require.False(t, WouldInvalidate(c, in, rejected(c.Revision), storeT0), "the first step only asks for confirmation")
		ch, err = b.store.ApplyVerdictFrom(ctx, c, rejected(c.Revision))
		require.NoError(t, err)
		require.Equal(t, Callable, ch.After.State, "as predicted: no flip")
		require.True(t, WouldInvalidate(ch.After, in, rejected(c.Revision), storeT0), "the confirming step flips")
		ch, err = b.store.ApplyVerdictFrom(ctx, ch.After, rejected(c.Revision))
		require.NoError(t, err)
		require.Equal(t, Invalid, ch.After.State, "as predicted: flipped")
	})
}

// TestRecordMisconfigured: a consumer's own misconfiguration keeps the
// state, shows as health misconfigured, and is no downstream.degraded
// event (the provider is fine); provider trouble after it is.
func TestRecordMisconfigured(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "u", "password": "p"},
		Settings: map[string]string{"subdomain": "nosuch"}}, 0)
	require.NoError(t, err)
	rev := ch.After.Revision

	ch, err = b.store.RecordMisconfigured(ctx, refZendesk, rev, "dns: no such host nosuch.zendesk.com")
	require.NoError(t, err)
	require.Equal(t, Added, ch.After.State)
	require.Equal(t, HealthMisconfigured, ch.After.Health)
	require.True(t, ch.After.Transient.Misconfigured)
	require.Equal(t, []string{EventUpdated}, eventTypes(ch.Events), "health changed; no downstream event")

	got, err := b.store.Get(ctx, refZendesk)
	require.NoError(t, err)
	require.Equal(t, ch.After.Transient, got.Transient, "stored and read back")

	ch, err = b.store.Patch(ctx, refZendesk, Input{Settings: map[string]string{"subdomain": "acme"}}, 0)
	require.NoError(t, err)
	require.Equal(t, HealthOK, ch.After.Health, "new settings: the old misconfiguration is gone")
	require.Equal(t, Transient{}, ch.After.Transient)
	ch, err = b.store.Patch(ctx, refZendesk, Input{Settings: map[string]string{"subdomain": "nosuch"}}, 0)
	require.NoError(t, err)
	rev = ch.After.Revision
	ch, err = b.store.RecordMisconfigured(ctx, refZendesk, rev, "dns: no such host nosuch.zendesk.com")
	require.NoError(t, err)
	require.Equal(t, HealthMisconfigured, ch.After.Health)

	ch, err = b.store.RecordTransient(ctx, refZendesk, rev, "status 503")
	require.NoError(t, err)
	require.Equal(t, HealthDegraded, ch.After.Health, "the latest failure decides")
	require.Equal(t, []string{EventDownstreamDegraded}, eventTypes(ch.Events))

	_, err = b.store.RecordMisconfigured(ctx, refZendesk, rev-1, "x")
	require.ErrorIs(t, err, ErrStale)

	ch, err = b.store.ApplyVerdict(ctx, refZendesk, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonMisconfiguredAccount})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthMisconfigured, ch.After.Health)
}

// TestNoDegradedEventWhileInvalid: a transient re-check of an invalid
// connection (a held verdict, a 5xx) sends no downstream.degraded event,
// and its end no downstream.recovered.
func TestNoDegradedEventWhileInvalid(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ch, err := b.store.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	rev := ch.After.Revision
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeInvalid, Reason: ReasonCredentialsRejected, HTTPStatus: 401})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	for range 3 {
		ch, err = b.store.RecordTransient(ctx, refBamboo, rev, "invalid verdict held")
		require.NoError(t, err)
		require.Equal(t, HealthNeedsAuth, ch.After.Health)
		require.Empty(t, ch.Events)
	}
	ch, err = b.store.ApplyVerdict(ctx, refBamboo, rev, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	require.Equal(t, []string{EventCallable}, eventTypes(ch.Events))
}

// TestCredentialValuesValidated: values longer than MaxCredentialLen, with
// a control character or not valid UTF-8 are refused, naming the field
// and never quoting the value; nothing is written.
func TestCredentialValuesValidated(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	secret := "sk_SECRET_"
	tests := map[string]struct {
		ref   Ref
		field string
		value string
	}{
		"TooLong":         {refBamboo, "api_key", secret + strings.Repeat("k", 900<<10)},
		"JustOverTheCap":  {refBamboo, "api_key", strings.Repeat("k", MaxCredentialLen+1)},
		"CRLF":            {refBamboo, "api_key", secret + "a\r\nX-Injected: 1"},
		"LF":              {refZendesk, "password", secret + "\n"},
		"NUL":             {refZendesk, "username", secret + "\x00"},
		"Tab":             {refBamboo, "api_key", secret + "\t"},
		"DEL":             {refBamboo, "api_key", secret + "\x7f"},
		"InvalidUTF8":     {refBamboo, "api_key", secret + "\xff\xfe"},
		"ReplacementChar": {refBamboo, "api_key", secret + "\uFFFD"},
		"OAuthToken":      {refHubSpot, "access_token", secret + "\r\n"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			in := Input{Credentials: map[string]string{tc.field: tc.value}}
			if tc.ref == refBamboo {
				in.Settings = map[string]string{"subdomain": "acme"}
			}
			if tc.ref == refZendesk {
				in.Settings = map[string]string{"subdomain": "acme"}
			}
			_, err := b.store.Put(ctx, tc.ref, in, 0)
			var fe *FieldError
			require.ErrorAs(t, err, &fe)
			require.ErrorIs(t, err, ErrInvalidCredential)
			require.Equal(t, "credentials."+tc.field, fe.Field)
			require.NotContains(t, err.Error(), secret)
			_, err = b.store.Get(ctx, tc.ref)
			require.ErrorIs(t, err, ErrNotFound, "nothing written")
		})
	}
	t.Run("AtTheCapAndUnicodeAccepted", func(t *testing.T) {
		ch, err := b.store.Put(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": strings.Repeat("k", MaxCredentialLen)},
			Settings: map[string]string{"subdomain": "acme"}}, 0)
		require.NoError(t, err)
		require.Len(t, ch.After.Credentials.APIKey, MaxCredentialLen)
		_, err = b.store.Put(ctx, refZendesk, Input{Credentials: map[string]string{"username": "agent@example.com", "password": "pässwörd-€"},
			Settings: map[string]string{"subdomain": "acme"}}, 0)
		require.NoError(t, err)
	})
}
