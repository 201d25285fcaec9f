package monitor

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/tasks"
)

func TestMain(m *testing.M) { redistest.Main(m) }

func TestFormatJSON(t *testing.T) {
	t.Parallel()
	require.Equal(t, "{\n  \"v\": 1,\n  \"consumer_id\": \"c1\"\n}", formatJSON("connection:validate", []byte(`{"v":1,"consumer_id":"c1"}`)))
	require.Equal(t, "not json", formatJSON("x", []byte("not json")))
	require.Empty(t, formatJSON("x", nil))
}

func TestMonitor(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	task, err := tasks.NewValidateTask("c1", "crm+pipedrive", tasks.ReasonCredentialsChanged, "rev1")
	require.NoError(t, err)
	_, err = client.Enqueue(task)
	require.NoError(t, err)

	const token = "monitor-token-0123456789"
	h, err := New(Config{RedisConnOpt: asynq.RedisClientOpt{Addr: rdb.Options().Addr, DB: rdb.Options().DB},
		ReadOnly: true, Authorize: func(r *http.Request) bool {
			_, pw, ok := r.BasicAuth()
			return ok && pw == token
		}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	mux := http.NewServeMux()
	mux.Handle(h.RootPath()+"/", h)
	mux.Handle(h.RootPath(), h)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	get := func(path string, auth bool) (*http.Response, string) {
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		if auth {
			req.SetBasicAuth("ops", token)
		}
		c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		resp, err := c.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, _ := get("/monitor/", false)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	require.Contains(t, resp.Header.Get("WWW-Authenticate"), "Basic")
	resp, _ = get("/monitor", true)
	require.Equal(t, http.StatusMovedPermanently, resp.StatusCode)
	resp, body := get("/monitor/", true)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, strings.ToLower(body), "<html")

	// The monitor's API shows the pending task with its payload formatted.
	resp, body = get("/monitor/api/queues/critical/pending_tasks", true)
	require.Equal(t, http.StatusOK, resp.StatusCode, body)
	var v struct {
		Tasks []struct {
			ID      string `json:"id"`
			Payload string `json:"payload"`
		} `json:"tasks"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &v))
	require.Len(t, v.Tasks, 1)
	require.Equal(t, "connection:validate:c1|crm+pipedrive:rev1", v.Tasks[0].ID)
	require.Contains(t, v.Tasks[0].Payload, "\n  \"consumer_id\": \"c1\"", "indented JSON")
}
