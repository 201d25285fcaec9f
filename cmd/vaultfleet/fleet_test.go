package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// fleetProcess is one subcommand running in-process, as the binary would.
type fleetProcess struct {
	name   string
	addr   string
	stderr *syncBuffer
	code   chan int
}

var addrRE = regexp.MustCompile(`"addr":"(127\.0\.0\.1:\d+)"`)

func startProcess(t *testing.T, ctx context.Context, vars map[string]string, args ...string) *fleetProcess {
	t.Helper()
	env, _, errOut := testEnv(vars)
	p := &fleetProcess{name: args[0], stderr: errOut, code: make(chan int, 1)}
	go func() { p.code <- run(ctx, append(args, "--addr", "127.0.0.1:0", "--log-format", "json"), env) }()
	require.Eventually(t, func() bool {
		m := addrRE.FindStringSubmatch(errOut.String())
		if m != nil {
			p.addr = m[1]
		}
		return m != nil
	}, 15*time.Second, 20*time.Millisecond, "%s did not start: %s", args[0], errOut)
	return p
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	_, body := getBody(t, "http://"+addr+"/metrics")
	return body
}

// families returns the metric family names of an exposition.
func families(body string) map[string]bool {
	out := map[string]bool{}
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			out[strings.Fields(rest)[0]] = true
		}
	}
	return out
}

// listedMetrics reads deploy/metrics.txt: name, type, exporter.
func listedMetrics(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "deploy", "metrics.txt"))
	require.NoError(t, err)
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fs := strings.Fields(line)
		require.GreaterOrEqual(t, len(fs), 3, "metrics.txt line %q", line)
		out[fs[0]] = fs[2]
	}
	require.NoError(t, sc.Err())
	return out
}

// TestFleetObservability runs serve, worker and scheduler against one
// private redis-server and an httptest provider, writes connections with
// known secrets through the API, and then checks what operators rely on:
// promtool accepts every scrape, every vaultfleet_ family is listed in
// deploy/metrics.txt and every listed one is really exported, a real
// Prometheus scrapes the worker and scheduler and answers a query for
// vaultfleet_checks_total, and no log line carries a secret.
func TestFleetObservability(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three processes and Prometheus")
	}
	t.Parallel()
	promtool, prometheus := toolPath(t, "promtool"), toolPath(t, "prometheus")

	const goodKey, badKey = fleetGoodKey, "bad-key-9a8b7c6d5e4f"
	dir := t.TempDir()
	srv := redistest.New(t)
	f := startAPIFleet(t, "redis://"+srv.Addr+"/0")
	serve, wk, sch, procs, token, api := f.serve, f.worker, f.scheduler, f.procs, f.token, f.api(t)
	for consumer, key := range map[string]string{"good": goodKey, "bad": badKey} {
		code, body := api("PUT", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", `{"credentials":{"api_key":"`+key+`"}}`)
		require.Contains(t, []int{200, 201}, code, body)
	}
	waitState := func(consumer, want string) {
		require.Eventually(t, func() bool {
			_, body := api("GET", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", "")
			var v struct{ Data struct{ State string } }
			return json.Unmarshal([]byte(body), &v) == nil && v.Data.State == want
		}, 20*time.Second, 50*time.Millisecond, "%s never became %s", consumer, want)
	}
	waitState("good", "callable")
	waitState("bad", "invalid")

	// The monitor and the status page sit behind the same tokens; a
	// browser sends one as the basic-auth password.
	for _, path := range []string{"/monitor/", "/"} {
		code, _ := getBody(t, "http://"+serve.addr+path)
		require.Equal(t, http.StatusUnauthorized, code, path)
		req, _ := http.NewRequest("GET", "http://"+serve.addr+path, nil)
		req.SetBasicAuth("ops", token)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
		require.Contains(t, strings.ToLower(string(body)), "<html", path)
	}
	req, _ := http.NewRequest("GET", "http://"+serve.addr+"/monitor/api/queues", nil)
	req.SetBasicAuth("ops", token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	var queues struct{ Queues []struct{ Queue string } }
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&queues))
	resp.Body.Close()
	require.NotEmpty(t, queues.Queues, "the monitor's API reads the fleet's queues")
	require.Contains(t, scrape(t, serve.addr), `vaultfleet_connections{integration="pipedrive",state="callable"} 1`)

	// promtool accepts every process's scrape; every vaultfleet_ family is
	// listed, and every listed family of these processes is exported.
	listed := listedMetrics(t)
	exported := map[string]bool{}
	for _, p := range procs {
		body := scrape(t, p.addr)
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "promtool check metrics on %s: %s", p.name, out)
		for fam := range families(body) {
			exported[fam] = true
			if strings.HasPrefix(fam, "vaultfleet_") || strings.HasPrefix(fam, "asynq_") {
				_, ok := listed[fam]
				require.True(t, ok, "%s exports %s, which deploy/metrics.txt does not list", p.name, fam)
			}
		}
	}
	// A labelled family shows in a scrape only once something was counted
	// (a refresh, a webhook, a dropped verdict); one this run did not
	// exercise must at least be defined by name in the fleet's code.
	source := fleetSource(t)
	notSeen := 0
	for name, exporter := range listed {
		if exporter == "prometheus" || exporter == "dev" || exported[name] {
			continue
		}
		notSeen++
		require.True(t, strings.HasPrefix(name, "vaultfleet_") && strings.Contains(source, `"`+name+`"`),
			"deploy/metrics.txt lists %s (%s) but no process exports it and no code defines it", name, exporter)
	}
	require.Less(t, notSeen, len(listed)/3, "most listed families show in a real scrape")

	// A real Prometheus scrapes the worker and the scheduler.
	promAddr := freeAddr(t)
	cfg := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: vaultfleet-worker
    static_configs: [{targets: ["%s"]}]
  - job_name: vaultfleet-scheduler
    static_configs: [{targets: ["%s"]}]
`, wk.addr, sch.addr)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	var promLog syncBuffer
	prom := exec.Command(prometheus, "--config.file="+cfgPath, "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+promAddr)
	prom.Stdout, prom.Stderr = &promLog, &promLog
	require.NoError(t, prom.Start())
	t.Cleanup(func() { _ = prom.Process.Kill(); _ = prom.Wait() })
	query := func(q string) []json.RawMessage {
		resp, err := http.Get("http://" + promAddr + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		var v struct {
			Status string
			Data   struct{ Result []json.RawMessage }
		}
		if json.NewDecoder(resp.Body).Decode(&v) != nil || v.Status != "success" {
			return nil
		}
		return v.Data.Result
	}
	require.Eventually(t, func() bool {
		return len(query(`vaultfleet_checks_total{job="vaultfleet-worker",integration="pipedrive",outcome="valid"}`)) == 1 &&
			len(query(`vaultfleet_checks_total{job="vaultfleet-worker",integration="pipedrive",outcome="invalid"}`)) == 1 &&
			len(query(`up{job="vaultfleet-scheduler"} == 1`)) == 1
	}, 60*time.Second, 250*time.Millisecond, "prometheus never saw the checks: %s", tail(promLog.String(), 2000))

	// No log line of any process carries a secret, and worker task lines
	// carry the fixed keys.
	for _, p := range procs {
		logs := p.stderr.String()
		for _, secret := range []string{goodKey, badKey, token, strings.SplitN(testKeys, ":", 2)[1]} {
			require.NotContains(t, logs, secret, "%s logged a secret", p.name)
		}
	}
	wlogs := wk.stderr.String()
	require.Regexp(t, `"task_id":"[^"]+".*"connection_id":"crm\+pipedrive".*"integration":"pipedrive".*"verdict":"(valid|invalid)"`, wlogs)
}

// fleetSource concatenates the fleet's non-test Go source.
func fleetSource(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	root := filepath.Join("..", "..")
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "artifacts") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".go") && !strings.HasSuffix(path, "_test.go") {
			src, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			b.Write(src)
		}
		return nil
	})
	require.NoError(t, err)
	return b.String()
}

// toolPath finds a Debian-packaged tool the test needs; .ci/run and
// scripts/test.sh install them.
func toolPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("VAULTFLEET_SKIP_TOOLS") == "1" {
			t.Skipf("%s not installed; VAULTFLEET_SKIP_TOOLS=1", name)
		}
		t.Fatalf("%s not installed: scripts/test.sh and .ci/run install it (apt-get install prometheus)", name)
	}
	return p
}

// fleetGoodKey is the one API key the provider of startAPIFleet accepts.
const fleetGoodKey = "good-key-5f0c1d2e3a4b"

// apiFleet is serve, worker and scheduler as processes over one Redis,
// with a catalog of one Pipedrive-like integration whose httptest
// provider accepts fleetGoodKey only.
type apiFleet struct {
	serve, worker, scheduler *fleetProcess
	procs                    []*fleetProcess
	token                    string
}

// startAPIFleet starts an apiFleet on redisURL; the test's cleanup stops
// it and fails the test if a process exits non-zero or does not stop.
func startAPIFleet(t *testing.T, redisURL string) *apiFleet {
	t.Helper()
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-API-Key") != fleetGoodKey {
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

	f := &apiFleet{token: "fleet-test-token-0123456789"}
	vars := map[string]string{
		envRedisURL: redisURL, secrets.EnvKeys: testKeys, envCatalog: catPath, envAPITokens: f.token,
	}
	ctx, cancel := context.WithCancel(context.Background())
	f.serve = startProcess(t, ctx, vars, "serve")
	f.worker = startProcess(t, ctx, vars, "worker")
	f.scheduler = startProcess(t, ctx, vars, "scheduler", "--tick", "200ms")
	f.procs = []*fleetProcess{f.serve, f.worker, f.scheduler}
	t.Cleanup(func() {
		cancel()
		for _, p := range f.procs {
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
	return f
}

// api sends an authenticated JSON request to serve; it returns the status
// and the body.
func (f *apiFleet) api(t *testing.T) func(method, path, body string) (int, string) {
	return func(method, path, body string) (int, string) {
		req, err := http.NewRequest(method, "http://"+f.serve.addr+path, strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+f.token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
}
