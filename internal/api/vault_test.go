package api_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/api"
	"github.com/vaultfleet/vaultfleet/state"
)

const vaultConsumer = "x-apideck-consumer-id: vc-1"

var vaultHdr = []string{"x-apideck-app-id: app-1", vaultConsumer}

func (b *vaultBundle) vreq(t *testing.T, method, path, body string, hdr ...string) response {
	t.Helper()
	return b.req(t, method, path, body, append(append([]string{}, vaultHdr...), hdr...)...)
}

// vaultErr checks Apideck's error envelope and returns its type_name.
func vaultErr(t *testing.T, r response, status int) string {
	t.Helper()
	require.Equal(t, status, r.status, "%s", r.body)
	m := r.json(t)
	require.EqualValues(t, status, m["status_code"])
	require.Equal(t, http.StatusText(status), m["error"])
	require.NotEmpty(t, m["message"])
	require.NotEmpty(t, m["ref"])
	_, hasDetail := m["detail"]
	require.True(t, hasDetail)
	name, _ := m["type_name"].(string)
	return name
}

func TestVaultHeadersAndErrorEnvelope(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	// The token is checked first, then the app id, then the consumer id.
	r := b.vreq(t, "GET", "/vault/connections", "", "Authorization:")
	require.Equal(t, "UnauthorizedError", vaultErr(t, r, 401))
	r = b.vreq(t, "GET", "/vault/connections", "", "x-apideck-app-id:")
	require.Equal(t, "RequestHeadersValidationError", vaultErr(t, r, 400))
	r = b.vreq(t, "GET", "/vault/connections", "", "x-apideck-consumer-id:")
	require.Equal(t, "RequestHeadersValidationError", vaultErr(t, r, 400))
	require.Contains(t, string(r.body), "x-apideck-consumer-id")
	r = b.vreq(t, "GET", "/vault/connections", "", "x-apideck-consumer-id: has space")
	require.Equal(t, "RequestHeadersValidationError", vaultErr(t, r, 400))
	// Consumer routes do not need the consumer header.
	r = b.vreq(t, "GET", "/vault/consumers", "", "x-apideck-consumer-id:")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)

	r = b.vreq(t, "GET", "/vault/connections/crm/nosuch", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, 404))
	r = b.vreq(t, "GET", "/vault/nowhere", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, 404))
	r = b.vreq(t, "PUT", "/vault/connections/hris/bamboohr", "{}")
	require.Equal(t, "MethodNotAllowedError", vaultErr(t, r, 405))
	require.Contains(t, r.header.Get("Allow"), "PATCH")
	r = b.vreq(t, "GET", "/vault/connections?configured=maybe", "")
	require.Equal(t, "RequestValidationError", vaultErr(t, r, 400))

	// /v1 keeps its own envelope and its RFC 3339 times.
	r = b.req(t, "GET", "/v1/connections/nowhere", "")
	require.Equal(t, http.StatusNotFound, r.status)
	require.Equal(t, "not_found", r.errorCode(t))
}

func TestVaultNeverEchoesCredentials(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	const secret = "vault-secret-api-key-123"
	r := b.vreq(t, "PATCH", "/vault/connections/hris/bamboohr",
		`{"enabled":true,"settings":{"api_key":"`+secret+`","subdomain":"acme"},"metadata":{"k":"v"},
		  "state":"callable","id":"x","custom_mappings":[],"unknown_field":1}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	d := r.json(t)["data"].(map[string]any)
	require.Equal(t, "added", d["state"], "read-only state in the body is ignored")
	require.Equal(t, "hris+bamboohr", d["id"])
	require.Equal(t, map[string]any{"subdomain": "acme"}, d["settings"])
	require.Equal(t, map[string]any{"k": "v"}, d["metadata"])
	require.Equal(t, "apiKey", d["auth_type"])
	require.IsType(t, float64(0), d["created_at"], "epoch milliseconds, a number")
	require.NotEmpty(t, r.header.Get("ETag"))
	var sawKey bool
	for _, f := range d["form_fields"].([]any) {
		ff := f.(map[string]any)
		_, hasValue := ff["value"]
		require.False(t, hasValue)
		if ff["id"] == "api_key" {
			sawKey = true
			require.Equal(t, true, ff["sensitive"])
		}
	}
	require.True(t, sawKey)

	// The credential went to the credentials, encrypted.
	c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "vc-1", ConnectionID: "hris+bamboohr"})
	require.NoError(t, err)
	require.Equal(t, secret, c.Credentials.APIKey)
	require.Equal(t, map[string]string{"subdomain": "acme"}, c.Settings)
	recKeys, err := b.rdb.Keys(context.Background(), "vf:*:conn:vc-1|hris+bamboohr").Result()
	require.NoError(t, err)
	require.Len(t, recKeys, 1)
	raw, err := b.rdb.HGetAll(context.Background(), recKeys[0]).Result()
	require.NoError(t, err)
	require.NotEmpty(t, raw)
	for _, v := range raw {
		require.NotContains(t, v, secret)
	}

	for _, p := range []string{"/vault/connections", "/vault/connections/hris/bamboohr", "/vault/consumers/vc-1", "/vault/consumers"} {
		r := b.vreq(t, "GET", p, "")
		require.Equal(t, http.StatusOK, r.status, "%s: %s", p, r.body)
		require.NotContains(t, string(r.body), secret, p)
	}
	// An unknown setting is refused without quoting the value.
	r = b.vreq(t, "PATCH", "/vault/connections/hris/bamboohr", `{"settings":{"nosuch":"`+secret+`"}}`)
	require.Equal(t, "RequestValidationError", vaultErr(t, r, 400))
	require.NotContains(t, string(r.body), secret)
}

func TestVaultIfMatchConflict(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	r := b.vreq(t, "PATCH", "/vault/connections/hris/bamboohr", `{"settings":{"api_key":"k","subdomain":"acme"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	tag := r.header.Get("ETag")
	r = b.vreq(t, "PATCH", "/vault/connections/hris/bamboohr", `{"enabled":false}`, "If-Match: "+tag)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.vreq(t, "PATCH", "/vault/connections/hris/bamboohr", `{"enabled":true}`, "If-Match: "+tag)
	require.Equal(t, "ConflictError", vaultErr(t, r, 409))
	r = b.vreq(t, "DELETE", "/vault/connections/hris/bamboohr", "", "If-Match: "+tag)
	require.Equal(t, "ConflictError", vaultErr(t, r, 409))
	// Disabled: validate is Apideck's InvalidStateError, not /v1's 409.
	r = b.vreq(t, "POST", "/vault/connections/hris/bamboohr/validate", "")
	require.Equal(t, "InvalidStateError", vaultErr(t, r, 422))
	r = b.vreq(t, "DELETE", "/vault/connections/hris/bamboohr", "")
	require.Equal(t, http.StatusNoContent, r.status)
	require.Empty(t, r.body)
	r = b.vreq(t, "DELETE", "/vault/connections/hris/bamboohr", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, 404))
}

func TestVaultTokenRefusedAndUnavailable(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	const secret = "wrong-secret-value-77"
	r := b.vreq(t, "PATCH", "/vault/connections/accounting/ccapi",
		`{"settings":{"client_id":"cc-client","client_secret":"`+secret+`"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Equal(t, "client_credentials", r.json(t)["data"].(map[string]any)["oauth_grant_type"])
	r = b.vreq(t, "POST", "/vault/connections/accounting/ccapi/token", "")
	require.Equal(t, "InvalidStateError", vaultErr(t, r, 422))
	require.Contains(t, string(r.body), "invalid_client")
	require.NotContains(t, string(r.body), secret)
	require.Equal(t, 1, b.tokenCalls())
	c, err := b.store.Get(context.Background(), state.Ref{ConsumerID: "vc-1", ConnectionID: "accounting+ccapi"})
	require.NoError(t, err)
	require.Empty(t, c.Credentials.AccessToken, "a refused grant stores nothing")
	require.Equal(t, secret, c.Credentials.Get("client_secret"), "and deletes nothing")

	// The right secret: a token, stored, never returned.
	r = b.vreq(t, "PATCH", "/vault/connections/accounting/ccapi", `{"settings":{"client_secret":"cc-secret-0001"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.vreq(t, "POST", "/vault/connections/accounting/ccapi/token", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.NotContains(t, string(r.body), "cc-token-0001")
	c, err = b.store.Get(context.Background(), state.Ref{ConsumerID: "vc-1", ConnectionID: "accounting+ccapi"})
	require.NoError(t, err)
	require.Equal(t, "cc-token-0001", c.Credentials.AccessToken)
	require.False(t, c.Credentials.ExpiresAt.IsZero())
	require.Equal(t, state.Callable, c.State)
}

func TestVaultHealthMapping(t *testing.T) {
	t.Parallel()
	for _, h := range state.Healths() {
		got := api.VaultHealth(h)
		switch h {
		case state.HealthMisconfigured, state.HealthRotationLost:
			require.Equal(t, "needs_auth", got, h)
		case state.HealthMissingScopes:
			require.Equal(t, "needs_consent", got, h)
		default:
			require.Equal(t, string(h), got, "shared values keep their name")
		}
	}
}

func TestVaultConsumersAPI(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	r := b.vreq(t, "POST", "/vault/consumers", `{"consumer_id":"vc-9","metadata":{"email":"a@b.c"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.vreq(t, "POST", "/vault/consumers", `{"consumer_id":"vc-9"}`)
	require.Equal(t, "ConflictError", vaultErr(t, r, 409))
	r = b.vreq(t, "POST", "/vault/consumers", `{"consumer_id":"vc-8","metadata":{"email":5}}`)
	require.Equal(t, "RequestValidationError", vaultErr(t, r, 400))
	for _, q := range []string{"limit=0", "limit=201", "limit=x", "cursor=garbage!"} {
		r = b.vreq(t, "GET", "/vault/consumers?"+q, "")
		require.Equal(t, "RequestValidationError", vaultErr(t, r, 400), q)
	}
	r = b.vreq(t, "GET", "/vault/consumers?limit=1&filter%5Bconsumer_id%5D=vc-", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	var page struct {
		Data []struct {
			ConsumerID    string `json:"consumer_id"`
			ApplicationID string `json:"application_id"`
		} `json:"data"`
		Meta struct {
			ItemsOnPage int `json:"items_on_page"`
		} `json:"meta"`
	}
	require.NoError(t, json.Unmarshal(r.body, &page))
	require.Len(t, page.Data, 1)
	require.Equal(t, "vc-9", page.Data[0].ConsumerID)
	require.Equal(t, "app-1", page.Data[0].ApplicationID)

	// A consumer known only by a /v1 connection is found, updated and
	// deleted too.
	r = b.req(t, "PUT", "/v1/consumers/v1-only/connections/hris/bamboohr", `{"credentials":{"api_key":"k"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	r = b.vreq(t, "GET", "/vault/consumers/v1-only", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.True(t, strings.Contains(string(r.body), `"services":["bamboohr"]`), "%s", r.body)
	r = b.vreq(t, "PATCH", "/vault/consumers/v1-only", `{"metadata":{"user_name":"Jo"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.vreq(t, "DELETE", "/vault/consumers/v1-only", "")
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	r = b.vreq(t, "GET", "/vault/consumers/v1-only", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, 404))
	r = b.vreq(t, "DELETE", "/vault/consumers/v1-only", "")
	require.Equal(t, "EntityNotFoundError", vaultErr(t, r, 404))
}

func TestVaultImportReplacesTokens(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	const path = "/vault/connections/crm/salesforce/import"
	r := b.vreq(t, "POST", path, `{"credentials":{"access_token":"at-1","refresh_token":"rt-1","expires_in":3600},
		"settings":{"instance_url":"https://acme.my.salesforce.com"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	ref := state.Ref{ConsumerID: "vc-1", ConnectionID: "crm+salesforce"}
	c, err := b.store.Get(context.Background(), ref)
	require.NoError(t, err)
	require.Equal(t, "rt-1", c.Credentials.RefreshToken)
	require.WithinDuration(t, c.Credentials.IssuedAt.Add(time.Hour), c.Credentials.ExpiresAt, 2*time.Second)

	r = b.vreq(t, "POST", path, `{"credentials":{"access_token":"at-2","issued_at":"2026-11-30T08:00:00Z"}}`)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	c, err = b.store.Get(context.Background(), ref)
	require.NoError(t, err)
	require.Equal(t, "at-2", c.Credentials.AccessToken)
	require.Empty(t, c.Credentials.RefreshToken, "an import without a refresh token drops the old one")
	require.Equal(t, "2026-11-30T10:00:00Z", c.Credentials.ExpiresAt.Format(time.RFC3339), "issued_at plus the catalog's lifetime (2h)")

	for _, body := range []string{`{}`, `{"credentials":{"access_token":""}}`, `{"credentials":{"access_token":"a","expires_in":0}}`,
		`{"credentials":{"access_token":"a","issued_at":"yesterday"}}`} {
		r = b.vreq(t, "POST", path, body)
		require.Equal(t, "RequestValidationError", vaultErr(t, r, 400), body)
	}
	r = b.vreq(t, "POST", "/vault/connections/hris/bamboohr/import", `{"credentials":{"access_token":"a"}}`)
	require.Equal(t, "InvalidStateError", vaultErr(t, r, 422))
}

// TestVaultStatusesDocumented replays every /vault request of the other
// tests' kinds, with Apideck's headers, and requires each status to be
// documented for its operation.
func TestVaultStatusesDocumented(t *testing.T) {
	t.Parallel()
	b := setupVault(t)
	doc := loadOpenAPI(t, api.OpenAPI())
	cases := []struct{ method, path, body string }{
		{"GET", "/vault/connections", ""},
		{"GET", "/vault/connections?configured=nope", ""},
		{"GET", "/vault/connections/hris/bamboohr", ""},
		{"GET", "/vault/connections/crm/nosuch", ""},
		{"PATCH", "/vault/connections/hris/bamboohr", `{"settings":{"api_key":"k","subdomain":"acme"}}`},
		{"PATCH", "/vault/connections/hris/bamboohr", `{"settings":{"subdomain":"a/b"}}`},
		{"PATCH", "/vault/connections/crm/salesforce", `{"settings":{"instance_url":"https://evil.example.com"}}`},
		{"POST", "/vault/connections/hris/bamboohr/validate", ""},
		{"POST", "/vault/connections/crm/hubspot/validate", ""},
		{"POST", "/vault/connections/crm/salesforce/import", `{"credentials":{"access_token":"a"}}`},
		{"POST", "/vault/connections/hris/bamboohr/import", `{"credentials":{"access_token":"a"}}`},
		{"POST", "/vault/connections/hris/bamboohr/token", ""},
		{"POST", "/vault/connections/accounting/ccapi/token", ""},
		{"DELETE", "/vault/connections/hris/bamboohr", ""},
		{"DELETE", "/vault/connections/hris/bamboohr", ""},
		{"POST", "/vault/consumers", `{"consumer_id":"doc-1"}`},
		{"POST", "/vault/consumers", `{"consumer_id":"doc-1"}`},
		{"GET", "/vault/consumers?limit=5", ""},
		{"GET", "/vault/consumers/doc-1", ""},
		{"GET", "/vault/consumers/nobody", ""},
		{"PATCH", "/vault/consumers/doc-1", `{"metadata":{"email":"x@y.z"}}`},
		{"PATCH", "/vault/consumers/nobody", `{"metadata":{}}`},
		{"DELETE", "/vault/consumers/doc-1", ""},
		{"PUT", "/vault/consumers", "{}"},
	}
	seen := map[int]bool{}
	for _, c := range cases {
		r := b.vreq(t, c.method, c.path, c.body)
		p := doc.patternOf(c.path)
		require.NotEmpty(t, p, c.path)
		method := c.method
		if _, ok := doc.Paths[p][method]; !ok {
			method = "GET" // 405s are documented on every operation
			require.Equal(t, http.StatusMethodNotAllowed, r.status)
		}
		require.Contains(t, doc.statuses(method, p), r.status, "%s %s: %s", c.method, c.path, r.body)
		seen[r.status] = true
	}
	for _, s := range []int{200, 204, 400, 404, 405, 409, 422} {
		require.True(t, seen[s], "no case answered %d: %v", s, seen)
	}
}
