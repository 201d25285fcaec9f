package ui

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func setup(t *testing.T, cfg Config) (*state.Store, *httptest.Server) {
	t.Helper()
	rdb := redistest.Start(t).Client(t)
	cat, err := catalog.Default()
	require.NoError(t, err)
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
	require.NoError(t, err)
	cfg.Store, cfg.Catalog = st, cat
	srv := httptest.NewServer(New(cfg))
	t.Cleanup(srv.Close)
	return st, srv
}

func get(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// cell returns the count in the states table for an integration and state
// column index (0 added, 1 authorized, 2 invalid, 3 callable).
func cells(t *testing.T, body, integration string) []string {
	t.Helper()
	re := regexp.MustCompile(`<tr data-integration="` + integration + `">(.*?)</tr>`)
	m := re.FindStringSubmatch(body)
	require.NotNil(t, m, "row for %s", integration)
	var out []string
	for _, c := range regexp.MustCompile(`<td class="n[^"]*">(\d+)</td>`).FindAllStringSubmatch(m[1], -1) {
		out = append(out, c[1])
	}
	return out
}

func TestStatusPage(t *testing.T) {
	t.Parallel()
	st, srv := setup(t, Config{MonitorPath: "/monitor", Refresh: 3 * time.Second,
		QueuesFunc: func(context.Context) ([]Queue, error) {
			return []Queue{{Name: "critical", Pending: 7}}, nil
		}})
	ctx := context.Background()
	put := func(consumer, conn string, in state.Input) {
		_, err := st.Put(ctx, state.Ref{ConsumerID: consumer, ConnectionID: conn}, in, 0)
		require.NoError(t, err)
	}
	bamboo := func(key string) state.Input {
		return state.Input{Credentials: map[string]string{"api_key": key}, Settings: map[string]string{"subdomain": "acme"}}
	}
	put("c1", "hris+bamboohr", bamboo("secret-key-one"))
	put("c2", "hris+bamboohr", bamboo("secret-key-two"))
	put("c3", "hris+bamboohr", state.Input{})
	ref := state.Ref{ConsumerID: "c1", ConnectionID: "hris+bamboohr"}
	c, err := st.Get(ctx, ref)
	require.NoError(t, err)
	_, err = st.ApplyVerdict(ctx, ref, c.Revision, state.Verdict{Outcome: state.OutcomeValid, Reason: state.ReasonCheckPassed, CheckedAt: time.Now()})
	require.NoError(t, err)

	req, _ := http.NewRequest("GET", srv.URL+"/", nil)
	code, body := get(t, req)
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `<meta http-equiv="refresh" content="3">`)
	// BambooHR: 2 added (one without credentials, one awaiting its check),
	// 0 authorized, 0 invalid, 1 callable, total 3.
	require.Equal(t, []string{"2", "0", "0", "1", "3"}, cells(t, body, "bamboohr"))
	require.Equal(t, []string{"0", "0", "0", "0", "0"}, cells(t, body, "salesforce"))
	require.Contains(t, body, `<td class="n" id="total">3</td>`)
	require.Contains(t, body, "vault.connection.callable")
	require.Contains(t, body, "check_passed")
	require.Contains(t, body, `href="/monitor/"`)
	require.Regexp(t, `<td>critical</td><td class="n">7</td>`, body)
	require.NotContains(t, body, "secret-key", "the page never shows credentials")

	req, _ = http.NewRequest("GET", srv.URL+"/nope", nil)
	code, _ = get(t, req)
	require.Equal(t, http.StatusNotFound, code)
}

func TestStatusPageAuth(t *testing.T) {
	t.Parallel()
	_, srv := setup(t, Config{Authorize: func(r *http.Request) bool {
		_, pw, ok := r.BasicAuth()
		return ok && pw == "right-token-0123456789"
	}})
	req, _ := http.NewRequest("GET", srv.URL+"/", nil)
	code, body := get(t, req)
	require.Equal(t, http.StatusUnauthorized, code)
	require.False(t, strings.Contains(body, "<table"))
	req.SetBasicAuth("ops", "right-token-0123456789")
	code, body = get(t, req)
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `id="states"`)
}
