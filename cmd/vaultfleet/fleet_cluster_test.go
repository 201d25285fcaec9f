package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// TestFleetOnCluster runs serve, worker and scheduler with
// REDIS_URL=redis-cluster://host:port,host:port,host:port (the README's
// form) on a local three-master Redis Cluster: 24 API-key connections
// written through the API become callable or invalid as an httptest
// provider says, and the fleet's event stream records it.
func TestFleetOnCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster and three processes")
	}
	cl := redistest.NewCluster(t) // this package has no redistest.Main

	const goodKey = "good-key-5f0c1d2e3a4b"
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-API-Key") != goodKey {
			http.Error(w, `{"error":"invalid api key"}`, http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, `{"ok":true}`)
	}))
	t.Cleanup(provider.Close)
	pu, _ := url.Parse(provider.URL)
	catPath := filepath.Join(t.TempDir(), "catalog.yaml")
	require.NoError(t, os.WriteFile(catPath, []byte(fmt.Sprintf(`integrations:
  - id: pipedrive
    name: Pipedrive
    unified_api: crm
    auth_type: api_key
    status: live
    credential_fields: [api_key]
    check:
      url: %s/v1/users/me
    allowed_hosts: ["%s"]
    allow_http: true
`, provider.URL, pu.Host)), 0o600))

	token := "fleet-test-token-0123456789"
	require.True(t, strings.HasPrefix(cl.URL(), "redis-cluster://") && strings.Count(cl.URL(), ",") == 2, cl.URL())
	vars := map[string]string{
		envRedisURL: cl.URL(), secrets.EnvKeys: testKeys, envCatalog: catPath, envAPITokens: token,
	}
	ctx, cancel := context.WithCancel(context.Background())
	serve := startProcess(t, ctx, vars, "serve")
	wk := startProcess(t, ctx, vars, "worker")
	sch := startProcess(t, ctx, vars, "scheduler", "--tick", "200ms")
	procs := []*fleetProcess{serve, wk, sch}
	t.Cleanup(func() {
		cancel()
		for _, p := range procs {
			select {
			case c := <-p.code:
				if c != 0 {
					t.Errorf("%s exited %d: %s", p.name, c, tail(p.stderr.String(), 2000))
				}
			case <-time.After(20 * time.Second):
				t.Errorf("%s did not stop", p.name)
			}
		}
	})

	api := func(method, path, body string) (int, string) {
		req, err := http.NewRequest(method, "http://"+serve.addr+path, strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	const n = 24
	want := map[string]string{}
	for i := range n {
		consumer, key, state := fmt.Sprintf("cluster-%02d", i), goodKey, "callable"
		if i%3 == 0 {
			key, state = fmt.Sprintf("bad-key-%02d", i), "invalid"
		}
		want[consumer] = state
		code, body := api("PUT", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", `{"credentials":{"api_key":"`+key+`"}}`)
		require.Equal(t, http.StatusCreated, code, body)
	}
	require.Eventually(t, func() bool {
		for consumer, state := range want {
			_, body := api("GET", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", "")
			var v struct{ Data struct{ State string } }
			if json.Unmarshal([]byte(body), &v) != nil || v.Data.State != state {
				return false
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "not every connection reached its state: %s", tail(wk.stderr.String(), 2000))
	require.Contains(t, scrape(t, serve.addr), `vaultfleet_connections{integration="pipedrive",state="callable"} 16`)
	require.Contains(t, scrape(t, serve.addr), `vaultfleet_connections{integration="pipedrive",state="invalid"} 8`)

	// The scheduler sweeps the cluster without errors.
	for _, p := range procs {
		require.NotContains(t, p.stderr.String(), `"level":"ERROR"`, "%s logged an error", p.name)
	}
	require.NotContains(t, sch.stderr.String(), "sweep failed")
}
