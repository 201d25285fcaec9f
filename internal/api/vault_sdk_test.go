package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// repoRoot finds the directory of go.mod above the package.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	require.NoError(t, err)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		require.NotEqual(t, parent, dir, "go.mod not found")
		dir = parent
	}
}

// requireSDK returns the node binary, or skips (VAULTFLEET_SKIP_TOOLS=1) or
// fails when node or the pinned SDK is missing.
func requireSDK(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	missing := ""
	switch {
	case err != nil:
		missing = "node is not installed"
	default:
		if _, err := os.Stat(filepath.Join(repoRoot(t), "node_modules", "@apideck", "unify", "package.json")); err != nil {
			missing = "node_modules/@apideck/unify is missing: run npm ci at the repository root"
		}
	}
	if missing != "" {
		if os.Getenv("VAULTFLEET_SKIP_TOOLS") == "1" {
			t.Skipf("%s; VAULTFLEET_SKIP_TOOLS=1 skips the Apideck SDK contract test", missing)
		}
		t.Fatalf("%s (.ci/run does; VAULTFLEET_SKIP_TOOLS=1 skips)", missing)
	}
	return node
}

// ccTokenServer is a client-credentials token endpoint that accepts one
// client and refuses every other one as real providers do.
func ccTokenServer(t *testing.T) (*httptest.Server, func() int) {
	t.Helper()
	calls := make(chan struct{}, 100)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls <- struct{}{}
		id, secret, _ := r.BasicAuth()
		w.Header().Set("Content-Type", "application/json")
		if r.FormValue("grant_type") != "client_credentials" || id != "cc-client" || secret != "cc-secret-0001" {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"error":"invalid_client"}`))
			return
		}
		_, _ = w.Write([]byte(`{"access_token":"cc-token-0001","token_type":"bearer","expires_in":3600}`))
	}))
	t.Cleanup(srv.Close)
	return srv, func() int { return len(calls) }
}

// vaultCatalog is the default catalog plus a client-credentials
// integration whose token endpoint is tokenURL.
func vaultCatalog(t *testing.T, tokenURL string) *catalog.Catalog {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "catalog", "default.yaml"))
	require.NoError(t, err)
	u, err := url.Parse(tokenURL)
	require.NoError(t, err)
	cc := `
  - id: ccapi
    name: CC API
    unified_api: accounting
    auth_type: oauth2
    status: live
    credential_fields: [client_id, client_secret]
    check:
      url: ` + tokenURL + `/check
    oauth:
      token_url: ` + tokenURL + `/token
      grant_type: client_credentials
    allow_http: true
    allowed_hosts: ["` + u.Host + `"]
`
	cat, err := catalog.Parse(append(b, []byte(cc)...))
	require.NoError(t, err)
	return cat
}

type vaultBundle struct {
	*bundle
	tokenCalls func() int
}

func setupVault(t *testing.T) *vaultBundle {
	t.Helper()
	tokenSrv, calls := ccTokenServer(t)
	rdb := redistest.Start(t).Client(t)
	cat := vaultCatalog(t, tokenSrv.URL)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	client := asynq.NewClientFromRedisClient(rdb)
	notifier := &recordingNotifier{next: scheduler.NewNotifier(client, cat)}
	h, err := api.New(api.Config{Store: st, Catalog: cat, Notifier: notifier, Enqueuer: client,
		Tokens: mustTokens(t, testToken)})
	require.NoError(t, err)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &vaultBundle{bundle: &bundle{rdb: rdb, store: st, cat: cat, srv: srv, notifier: notifier,
		inspector: asynq.NewInspectorFromRedisClient(rdb)}, tokenCalls: calls}
}

// vaultMappings lists every value vaultfleet can put in an Apideck enum
// field, for the script to check against the SDK's enums.
func vaultMappings(cat *catalog.Catalog) map[string][]string {
	m := map[string][]string{}
	for _, s := range state.States() {
		m["states"] = append(m["states"], string(s))
	}
	for _, h := range state.Healths() {
		m["health"] = append(m["health"], api.VaultHealth(h))
	}
	for _, a := range []catalog.AuthType{catalog.AuthOAuth2, catalog.AuthAPIKey, catalog.AuthBasic} {
		m["auth_types"] = append(m["auth_types"], api.VaultAuthType(a))
	}
	for _, s := range []catalog.Status{catalog.StatusLive, catalog.StatusBeta, catalog.StatusEarlyAccess,
		catalog.StatusDevelopment, catalog.StatusConsidering} {
		m["statuses"] = append(m["statuses"], api.VaultStatus(s))
	}
	m["integration_states"] = []string{api.VaultIntegrationState(nil)}
	for _, in := range cat.Integrations {
		m["integration_states"] = append(m["integration_states"], api.VaultIntegrationState(in))
		if g := in.GrantType(); g != "" {
			m["grant_types"] = append(m["grant_types"], g)
		}
	}
	m["grant_types"] = append(m["grant_types"], catalog.GrantAuthorizationCode, catalog.GrantClientCredentials)
	return m
}

// TestVaultSDKContract drives /vault with Apideck's own TypeScript SDK
// (testdata/sdk-contract.mjs) and then checks on the server side what the
// SDK cannot see.
func TestVaultSDKContract(t *testing.T) {
	node := requireSDK(t)
	b := setupVault(t)
	mappings, err := json.Marshal(vaultMappings(b.cat))
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, filepath.Join("testdata", "sdk-contract.mjs"))
	cmd.Env = append(os.Environ(), "VF_URL="+b.srv.URL, "VF_TOKEN="+testToken, "VF_MAPPINGS="+string(mappings))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	require.NoError(t, err, "the Apideck SDK contract failed:\nstdout: %s\nstderr: %s", stdout.String(), stderr.String())
	var out struct {
		OK     bool     `json:"ok"`
		Checks []string `json:"checks"`
	}
	require.NoError(t, json.Unmarshal(bytes.TrimSpace(stdout.Bytes()), &out), "stdout: %s", stdout.String())
	require.True(t, out.OK)
	require.GreaterOrEqual(t, len(out.Checks), 19, "checks run: %v", out.Checks)

	// The token endpoint was really called (once with the right client).
	require.Equal(t, 1, b.tokenCalls())
	// validate enqueued a validation; the unknown-age import a refresh.
	pending, err := b.inspector.ListPendingTasks(tasks.QueueCritical)
	require.NoError(t, err)
	var types []string
	for _, ti := range pending {
		types = append(types, ti.Type)
	}
	require.Contains(t, types, tasks.TypeValidate)
	require.Contains(t, types, tasks.TypeRefreshToken)

	// Deleting sdk-consumer-1 left nothing of it in the store (queued
	// tasks for it stay: the worker skips a connection that is gone).
	keys, err := b.rdb.Keys(ctx, "vf:*sdk-consumer-1*").Result()
	require.NoError(t, err)
	require.Empty(t, keys)
	all, err := b.rdb.Keys(ctx, "vf:*").Result()
	require.NoError(t, err)
	for _, k := range all {
		if typ, _ := b.rdb.Type(ctx, k).Result(); typ == "zset" {
			members, err := b.rdb.ZRange(ctx, k, 0, -1).Result()
			require.NoError(t, err)
			for _, m := range members {
				require.False(t, strings.HasPrefix(m, "sdk-consumer-1|") || m == "sdk-consumer-1", "%s still holds %s", k, m)
			}
		}
	}
	evs, err := b.store.ReadEvents(ctx, "0", 1000)
	require.NoError(t, err)
	deleted := 0
	for _, e := range evs {
		if e.Type == state.EventDeleted && e.ConsumerID == "sdk-consumer-1" {
			deleted++
		}
	}
	// salesforce by DELETE, then bamboohr and ccapi by the consumer delete.
	require.Equal(t, 3, deleted)
}
