package worker

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

const ccID = "accounting+ccapi"

// ccYAML is a client-credentials integration: no refresh token; the fleet
// runs the grant again with the connection's own client.
const ccYAML = `
  - id: ccapi
    name: CC API
    unified_api: accounting
    auth_type: oauth2
    status: live
    credential_fields: [client_id, client_secret]
    check:
      url: http://HOST/cc/me
    oauth:
      token_url: http://HOST/cc/token
      grant_type: client_credentials
    allow_http: true
    allowed_hosts: ["HOST"]
`

// ccAPI is a client-credentials token endpoint: it accepts one client and
// hands out a new access token on every grant.
type ccAPI struct {
	grants atomic.Int32
	latest atomic.Value
}

func setupCC(t *testing.T) (*bundle, *ccAPI) {
	t.Helper()
	b := setup(t)
	y := strings.ReplaceAll(strings.ReplaceAll(catalogYAML, "INSTHOSTS", "")+ccYAML, "HOST", b.p.host)
	cat, err := catalog.Parse([]byte(y))
	require.NoError(t, err)
	b.cat, b.store = cat, b.newStore(cat)
	api := &ccAPI{}
	api.latest.Store("")
	b.p.handle("/cc/token", func(rw http.ResponseWriter, r *http.Request) {
		id, secret, _ := r.BasicAuth()
		if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "client_credentials" ||
			r.PostForm.Get("refresh_token") != "" {
			writeJSON(rw, http.StatusBadRequest, map[string]any{"error": "unsupported_grant_type"})
			return
		}
		if id != clientID || secret != clientSecret {
			writeJSON(rw, http.StatusUnauthorized, map[string]any{"error": "invalid_client"})
			return
		}
		n := api.grants.Add(1)
		at := "at_SECRET_cc_" + string(rune('0'+n))
		api.latest.Store(at)
		writeJSON(rw, http.StatusOK, map[string]any{"access_token": at, "token_type": "Bearer", "expires_in": 3600})
	})
	b.p.handle("/cc/me", func(rw http.ResponseWriter, r *http.Request) {
		if at := api.latest.Load().(string); at == "" || r.Header.Get("Authorization") != "Bearer "+at {
			writeJSON(rw, http.StatusUnauthorized, map[string]any{"error": "invalid_token"})
			return
		}
		writeJSON(rw, http.StatusOK, map[string]any{"ok": true})
	})
	return b, api
}

func TestClientCredentialsGrantRunsAgainOnRefresh(t *testing.T) {
	b, api := setupCC(t)
	// Client only, no token yet: the fleet gets the first one itself.
	c := b.put(ccID, map[string]string{"client_id": clientID, "client_secret": clientSecret}, nil)
	require.Equal(t, state.Added, c.State)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ccID, tasks.ReasonExpired, "0")))
	require.EqualValues(t, 1, api.grants.Load())
	c = b.get(ccID)
	require.Equal(t, "at_SECRET_cc_1", c.Credentials.AccessToken)
	require.Equal(t, state.Callable, c.State)
	require.Equal(t, state.HealthOK, c.Health)
	require.Equal(t, clientSecret, c.Credentials.Get("client_secret"), "the client stays")

	// Fresh: nothing to do. Near expiry: the grant runs again (no refresh
	// token needed), and the token is due in the refresh index.
	require.NoError(t, process(t, w, refreshTask(t, ccID, tasks.ReasonScheduled, "1")))
	require.EqualValues(t, 1, api.grants.Load())
	// A one-hour token with 90 s left: inside its refresh window.
	exp := time.Now().Add(90 * time.Second)
	_, err := b.store.StoreTokens(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: ccID}, "",
		state.Tokens{AccessToken: c.Credentials.AccessToken, ExpiresAt: exp, IssuedAt: exp.Add(-time.Hour)})
	require.NoError(t, err)
	require.Equal(t, state.HealthOK, b.get(ccID).Health)
	require.NoError(t, process(t, w, refreshTask(t, ccID, tasks.ReasonScheduled, "2")))
	require.EqualValues(t, 2, api.grants.Load())
	c = b.get(ccID)
	require.Equal(t, "at_SECRET_cc_2", c.Credentials.AccessToken)
	due, err := b.rdb.Keys(context.Background(), "vf:*:due:refresh").Result()
	require.NoError(t, err)
	found := false
	for _, k := range due {
		if _, err := b.rdb.ZScore(context.Background(), k, consumer+"|"+ccID).Result(); err == nil {
			found = true
		}
	}
	require.True(t, found, "a client-credentials token is scheduled for refresh")

	// An expired token is replaced before the check, not after its 401.
	_, err = b.store.Patch(context.Background(), state.Ref{ConsumerID: consumer, ConnectionID: ccID},
		state.Input{Credentials: map[string]string{"expires_at": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}}, 0)
	require.NoError(t, err)
	require.Equal(t, state.HealthPendingRefresh, b.get(ccID).Health)
	require.NoError(t, process(t, w, validateTask(t, ccID)))
	require.EqualValues(t, 3, api.grants.Load())
	c = b.get(ccID)
	require.Equal(t, state.Callable, c.State)
	require.NotNil(t, c.Verdict)
	require.Equal(t, state.OutcomeValid, c.Verdict.Outcome)
	requireNoSecrets(t, b.logs.String())
}

func TestClientCredentialsRefusedClientIsAVerdict(t *testing.T) {
	b, api := setupCC(t)
	b.put(ccID, map[string]string{"client_id": clientID, "client_secret": "cs_SECRET_wrong",
		"access_token": "at_SECRET_old", "expires_at": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}, nil)
	w := b.worker()
	require.NoError(t, process(t, w, refreshTask(t, ccID, tasks.ReasonExpired, "1")))
	c := b.get(ccID)
	require.Equal(t, state.Invalid, c.State)
	require.Equal(t, state.HealthRevoked, c.Health)
	require.Equal(t, "cs_SECRET_wrong", c.Credentials.Get("client_secret"), "credentials are never deleted")
	require.Zero(t, api.grants.Load())
	// Not tried again until the consumer changes the client.
	require.NoError(t, process(t, w, refreshTask(t, ccID, tasks.ReasonExpired, "2")))
	require.Equal(t, 1, b.p.count("/cc/token"), "a refused client is not tried again")
	requireNoSecrets(t, b.logs.String())
}
