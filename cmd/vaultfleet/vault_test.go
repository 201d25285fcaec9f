package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/internal/session"
)

// serve with sessions: an operator opens a session; its token works on the
// consumer's /vault/connections and the page, and nowhere else.
func TestServeVaultSessions(t *testing.T) {
	if testing.Short() {
		t.Skip("starts serve")
	}
	srv := redistest.New(t)
	const token = "serve-vault-token-0123456789"
	vars := map[string]string{envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: testKeys,
		envAPITokens: token, envSessionKeys: session.NewKey("s1"), envPublicURL: "https://vault.example.com",
		envRedirectURIs: "https://app.example.com"}
	ctx, cancel := context.WithCancel(context.Background())
	p := startProcess(t, ctx, vars, "serve")
	t.Cleanup(func() {
		cancel()
		<-p.code
	})
	base := "http://" + p.addr
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	do := func(method, path, bearer, body string, hdr ...string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		require.NoError(t, err)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := noFollow.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := do("POST", "/vault/sessions", token, `{"redirect_uri":"https://app.example.com/back","settings":{"allow_actions":["disable"]}}`,
		"x-apideck-app-id", "app", "x-apideck-consumer-id", "acme")
	require.Equal(t, http.StatusOK, code, body)
	var out struct {
		Data struct {
			SessionURI   string `json:"session_uri"`
			SessionToken string `json:"session_token"`
		} `json:"data"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	tok := out.Data.SessionToken
	require.NotEmpty(t, tok)
	require.Equal(t, "https://vault.example.com/vault/session?token="+tok, out.Data.SessionURI)

	code, body = do("GET", "/vault/connections", tok, "")
	require.Equal(t, http.StatusOK, code, body)
	code, _ = do("GET", "/vault/session?token="+tok, "", "")
	require.Equal(t, http.StatusSeeOther, code)
	for _, path := range []string{"/v1/connections", "/v1/consumers/acme/connections"} {
		code, _ = do("GET", path, tok, "")
		require.Equal(t, http.StatusUnauthorized, code, path)
	}
	code, _ = do("GET", "/vault/consumers", tok, "", "x-apideck-app-id", "app")
	require.Equal(t, http.StatusForbidden, code)
	code, _ = do("GET", "/monitor/api/queues", tok, "")
	require.Equal(t, http.StatusUnauthorized, code)
	code, _ = do("GET", "/", tok, "")
	require.Equal(t, http.StatusUnauthorized, code, "the status page")
	code, body = do("DELETE", "/vault/connections/crm/salesforce", tok, "")
	require.Equal(t, http.StatusForbidden, code, body)
	require.Contains(t, body, "action delete is not allowed")
}
