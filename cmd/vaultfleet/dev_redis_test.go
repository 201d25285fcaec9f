package main

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/tasks"
)

var (
	bannerBaseRE   = regexp.MustCompile(`status page  (http://127\.0\.0\.1:\d+)/`)
	bannerExportRE = regexp.MustCompile(`(?m)^export REDIS_URL=(redis://127\.0\.0\.1:\d+/0)$`)
)

// startDev runs `vaultfleet dev` in-process until the test ends and
// returns its base URL, its stdout and stderr, and a stop function that
// waits for its exit code.
func startDev(t *testing.T, vars map[string]string, args ...string) (string, *syncBuffer, *syncBuffer, func() int) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	env, out, errOut := testEnv(vars)
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, append([]string{"dev", "--addr", "127.0.0.1:0", "--summary", "0"}, args...), env)
	}()
	var base string
	require.Eventually(t, func() bool {
		select {
		case c := <-code:
			code <- c
			return true
		default:
		}
		if m := bannerBaseRE.FindStringSubmatch(out.String()); m != nil {
			base = m[1]
		}
		return base != ""
	}, 30*time.Second, 20*time.Millisecond)
	require.NotEmpty(t, base, "dev did not start: %s\n%s", out, errOut)
	stopped := false
	stop := func() int {
		stopped = true
		cancel()
		select {
		case c := <-code:
			return c
		case <-time.After(20 * time.Second):
			t.Fatal("dev did not stop within 20s")
			return -1
		}
	}
	t.Cleanup(func() {
		if !stopped {
			stop()
		}
	})
	return base, out, errOut, stop
}

// connState reads the state of one connection of a consumer.
func connState(t *testing.T, base, consumer, id string) string {
	t.Helper()
	var v struct{ Data []apiConn }
	getJSON(t, base+"/v1/consumers/"+consumer+"/connections", &v)
	for _, c := range v.Data {
		if c.ID == id {
			return c.State
		}
	}
	return ""
}

// TestDevTwiceOnOneRedis runs dev twice against one private redis-server,
// as `REDIS_URL=... vaultfleet dev` and then `vaultfleet dev --redis ...`
// would: the second run opens what
// the first sealed (its demo connections and one added through the API),
// validates again, and its banner says dev writes into that Redis.
func TestDevTwiceOnOneRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("runs dev twice")
	}
	t.Parallel()
	srv := redistest.New(t)
	url := "redis://" + srv.Addr + "/0"
	for i := range 2 {
		// The first run reads REDIS_URL, the second takes --redis.
		vars, args := map[string]string{envRedisURL: url}, []string(nil)
		if i == 1 {
			vars, args = nil, []string{"--redis", url}
		}
		base, out, errOut, stop := startDev(t, vars, args...)
		require.Contains(t, out.String(), "on the Redis that REDIS_URL (or --redis) names", "run %d", i+1)
		require.Contains(t, out.String(), "Redis        "+url+"   (dev writes there", "run %d", i+1)
		// An API-key connection becomes callable only once its check ran,
		// which opens its sealed credentials.
		require.Eventually(t, func() bool { return connState(t, base, "acme", "hris+bamboohr") == "callable" },
			30*time.Second, 100*time.Millisecond, "run %d: acme's BambooHR never became callable: %s", i+1, errOut)
		if i == 0 {
			req, err := http.NewRequest(http.MethodPut, base+"/v1/consumers/zed/connections/crm/pipedrive",
				strings.NewReader(`{"credentials":{"api_key":"zed-key-0123456789"}}`))
			require.NoError(t, err)
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Less(t, resp.StatusCode, 300)
		} else {
			code, body := getBody(t, base+"/v1/consumers/zed/connections/crm/pipedrive")
			require.Equal(t, http.StatusOK, code, "what the first run sealed opens in the second: %s", body)
		}
		require.NotContains(t, errOut.String(), "cannot decrypt")
		require.Equal(t, 0, stop(), "run %d: %s", i+1, errOut)
	}
}

// TestDevBannerRedisAddress: dev on its embedded Redis prints where that
// Redis is and a ready export line; `vaultfleet enqueue` with it reaches the
// fleet, and the monitor lists every queue of the fleet before anything was
// enqueued on some of them.
func TestDevBannerRedisAddress(t *testing.T) {
	t.Parallel()
	base, out, errOut, stop := startDev(t, nil, "--consumers", "2")
	m := bannerExportRE.FindStringSubmatch(out.String())
	require.NotNil(t, m, "banner: %s", out)

	env, eout, eerr := testEnv(map[string]string{envRedisURL: m[1]})
	require.Equal(t, 0, run(context.Background(), []string{"enqueue", "validate", "--consumer", "acme", "--connection", "hris+bamboohr"}, env), eerr.String())
	require.Contains(t, eout.String(), "enqueued connection:validate task")

	requireAllQueues(t, base+"/monitor/api/queues", "")

	// The banner's count is what is stored.
	sm := regexp.MustCompile(`seeded (\d+) demo connections`).FindStringSubmatch(out.String())
	require.NotNil(t, sm, "banner: %s", out)
	var list struct{ Data []apiConn }
	getJSON(t, base+"/v1/connections?limit=500", &list)
	require.Equal(t, sm[1], strconv.Itoa(len(list.Data)), "banner: %s", out)
	require.Equal(t, 0, stop(), errOut.String())
}

// requireAllQueues asks the monitor's API for its queues and wants every
// queue of the fleet, each of which opens.
func requireAllQueues(t *testing.T, url, password string) {
	t.Helper()
	get := func(u string) (int, []byte) {
		req, err := http.NewRequest(http.MethodGet, u, nil)
		require.NoError(t, err)
		if password != "" {
			req.SetBasicAuth("ops", password)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		var b json.RawMessage
		_ = json.NewDecoder(resp.Body).Decode(&b)
		return resp.StatusCode, b
	}
	code, body := get(url)
	require.Equal(t, http.StatusOK, code, string(body))
	var v struct {
		Queues []struct {
			Queue string `json:"queue"`
		} `json:"queues"`
	}
	require.NoError(t, json.Unmarshal(body, &v))
	var names []string
	for _, q := range v.Queues {
		names = append(names, q.Queue)
	}
	for q := range tasks.Queues() {
		require.True(t, slices.Contains(names, q), "queue %s missing from the monitor: %v", q, names)
		code, body := get(url + "/" + q)
		require.Equal(t, http.StatusOK, code, "queue %s: %s", q, body)
	}
}

// TestServeMonitorListsAllQueues: on a Redis nothing was enqueued to yet,
// serve's monitor lists (and opens) every queue of the fleet.
func TestServeMonitorListsAllQueues(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	const token = "serve-monitor-token-0123456789"
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	p := startProcess(t, ctx, map[string]string{envRedisURL: "redis://" + srv.Addr + "/0",
		envAPITokens: token, "VAULTFLEET_ENCRYPTION_KEYS": testKeys}, "serve")
	requireAllQueues(t, "http://"+p.addr+"/monitor/api/queues", token)
	cancel()
	require.Equal(t, 0, <-p.code, p.stderr.String())
}
