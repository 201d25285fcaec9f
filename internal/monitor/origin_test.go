package monitor

import (
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

// TestMonitorRefusesCrossSiteWrites drives a writable monitor as a page on
// another site would, with the operator's basic auth cached by the
// browser: a form POST that pauses a queue, a text/plain batch delete.
// Both are refused and change nothing; the monitor's own requests work.
func TestMonitorRefusesCrossSiteWrites(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	opt := asynq.RedisClientOpt{Addr: rdb.Options().Addr, DB: rdb.Options().DB}
	client := asynq.NewClientFromRedisClient(rdb)
	t.Cleanup(func() { _ = client.Close() })
	task, err := tasks.NewValidateTask("c1", "crm+pipedrive", tasks.ReasonCredentialsChanged, "rev1")
	require.NoError(t, err)
	info, err := client.Enqueue(task)
	require.NoError(t, err)
	inspector := asynq.NewInspectorFromRedisClient(rdb)

	const token = "monitor-token-0123456789"
	h, err := New(Config{RedisConnOpt: opt, Authorize: func(r *http.Request) bool {
		_, pw, ok := r.BasicAuth()
		return ok && pw == token
	}})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	mux := http.NewServeMux()
	mux.Handle(h.RootPath()+"/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	do := func(method, path, body string, hdr map[string]string) (int, string) {
		req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
		require.NoError(t, err)
		req.SetBasicAuth("ops", token)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	paused := func() bool {
		qi, err := inspector.GetQueueInfo(tasks.QueueCritical)
		require.NoError(t, err)
		return qi.Paused
	}
	pending := func() int {
		qi, err := inspector.GetQueueInfo(tasks.QueueCritical)
		require.NoError(t, err)
		return qi.Pending
	}
	pause := "/monitor/api/queues/" + tasks.QueueCritical + ":pause"
	batchDelete := "/monitor/api/queues/" + tasks.QueueCritical + "/pending_tasks:batch_delete"
	deleteBody := `{"task_ids":["` + info.ID + `"]}`

	for name, tc := range map[string]struct {
		method, path, body string
		hdr                map[string]string
		want               int
	}{
		"FormPostFromOtherSite": {"POST", pause, "", map[string]string{
			"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
			"Content-Type": "application/x-www-form-urlencoded"}, http.StatusForbidden},
		"OriginOnly": {"POST", pause, "", map[string]string{"Origin": "https://evil.example"}, http.StatusForbidden},
		"SameSiteSubdomain": {"POST", pause, "", map[string]string{
			"Origin": "https://other.example.com", "Sec-Fetch-Site": "same-site"}, http.StatusForbidden},
		"TextPlainBatchDelete": {"POST", batchDelete, deleteBody, map[string]string{
			"Content-Type": "text/plain"}, http.StatusUnsupportedMediaType},
		"TextPlainFromOtherSite": {"POST", batchDelete, deleteBody, map[string]string{
			"Origin": "https://evil.example", "Content-Type": "text/plain;charset=UTF-8"}, http.StatusForbidden},
		"FormTypeWithoutBody": {"POST", pause, "", map[string]string{
			"Sec-Fetch-Site": "same-origin", "Content-Type": "application/x-www-form-urlencoded"}, http.StatusUnsupportedMediaType},
	} {
		code, body := do(tc.method, tc.path, tc.body, tc.hdr)
		require.Equal(t, tc.want, code, "%s: %s", name, body)
	}
	require.False(t, paused(), "a refused request paused the queue")
	require.Equal(t, 1, pending(), "a refused request deleted the task")

	// The monitor's own page: same origin, no body or JSON.
	code, body := do("POST", pause, "", map[string]string{"Sec-Fetch-Site": "same-origin", "Origin": srv.URL})
	require.Equal(t, http.StatusNoContent, code, body)
	require.True(t, paused())
	code, body = do("POST", batchDelete, deleteBody, map[string]string{
		"Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"})
	require.Equal(t, http.StatusOK, code, body)
	require.Zero(t, pending())
}

// TestMonitorReadOnlyRefusesWrites: read-only refuses every write, even
// one asynqmon's router would not see as an API call.
func TestMonitorReadOnlyRefusesWrites(t *testing.T) {
	t.Parallel()
	rdb := redistest.Start(t).Client(t)
	h, err := New(Config{RedisConnOpt: asynq.RedisClientOpt{Addr: rdb.Options().Addr, DB: rdb.Options().DB}, ReadOnly: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.Close() })
	for _, m := range []string{"POST", "PUT", "PATCH", "DELETE"} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(m, "/monitor/api/queues/"+tasks.QueueCritical+":pause", nil)
		req.Header.Set("Sec-Fetch-Site", "same-origin")
		h.ServeHTTP(rec, req)
		require.Equal(t, http.StatusMethodNotAllowed, rec.Code, m)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/monitor/api/queues", nil))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
}
