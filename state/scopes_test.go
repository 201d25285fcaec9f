package state

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

// The connect flow records the granted scopes with the tokens: a required
// scope missing keeps the connection out of callable whatever a check says,
// until tokens with the scope arrive; tokens written without scopes leave
// them unknown, which judges nothing.
func TestGrantedScopes(t *testing.T) {
	t.Parallel()
	b := setupStore(t)
	ctx := context.Background()
	ref := Ref{ConsumerID: "c1", ConnectionID: "crm+hubspot"}

	ch, err := b.store.Put(ctx, ref, Input{Credentials: map[string]string{"access_token": "at1", "refresh_token": "rt1"},
		GrantedScopes: []string{"oauth"}}, 0)
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthMissingScopes, ch.After.Health)

	// A passing check does not make it callable.
	ch, err = b.store.ApplyVerdict(ctx, ref, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, CheckedAt: storeT0})
	require.NoError(t, err)
	require.Equal(t, Invalid, ch.After.State)
	require.Equal(t, HealthMissingScopes, ch.After.Health)

	got, err := b.store.Get(ctx, ref)
	require.NoError(t, err)
	require.Equal(t, []string{"oauth"}, got.GrantedScopes)

	// Reauthorized with every scope: a new revision, callable.
	ch, err = b.store.Patch(ctx, ref, Input{Credentials: map[string]string{"access_token": "at2", "refresh_token": "rt2"},
		GrantedScopes: []string{"oauth", "crm.read"}}, 0)
	require.NoError(t, err)
	require.Greater(t, ch.After.Revision, ch.Before.Revision)
	require.Equal(t, Callable, ch.After.State)

	// Same tokens, fewer scopes: still a change.
	ch, err = b.store.Patch(ctx, ref, Input{Credentials: map[string]string{"access_token": "at2", "refresh_token": "rt2"},
		GrantedScopes: []string{}}, 0)
	require.NoError(t, err)
	require.Equal(t, HealthMissingScopes, ch.After.Health)
	got, err = b.store.Get(ctx, ref)
	require.NoError(t, err)
	require.NotNil(t, got.GrantedScopes, "an empty grant is known, not unknown")

	// Tokens written by hand: scopes unknown, not judged.
	ch, err = b.store.Patch(ctx, ref, Input{Credentials: map[string]string{"access_token": "at3"}}, 0)
	require.NoError(t, err)
	require.Nil(t, ch.After.GrantedScopes)
	require.Equal(t, Callable, ch.After.State)
}
