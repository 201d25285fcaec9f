package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// buildBinary builds vaultfleet once per test binary.
var (
	binOnce sync.Once
	binPath string
	binErr  error
)

func buildBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vaultfleet-bin-*")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "vaultfleet")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, binErr)
	return binPath
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

type apiConn struct {
	ID         string `json:"id"`
	ConsumerID string `json:"consumer_id"`
	ServiceID  string `json:"service_id"`
	State      string `json:"state"`
	Health     string `json:"health"`
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode, url)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(v))
}

func getBody(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// metricSum adds up the samples of a metric whose labels contain every
// given label pair.
func metricSum(body, name string, labels ...string) float64 {
	var sum float64
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// TestDevEndToEnd runs the built binary's dev command as a user would and
// waits, bounded, until the fleet has shown what the quickstart promises.
func TestDevEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end: runs the fleet for up to two minutes")
	}
	bin := buildBinary(t)
	addr := freeAddr(t)
	base := "http://" + addr
	var stdout, stderr syncBuffer
	cmd := exec.Command(bin, "dev", "--addr", addr, "--summary", "2s", "--tenant-after", "15s")
	cmd.Env = append(os.Environ(), "REDIS_URL=", "VAULTFLEET_API_TOKENS=", "VAULTFLEET_ENCRYPTION_KEYS=")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("dev stdout:\n%s\ndev stderr (tail):\n%s", stdout.String(), tail(stderr.String(), 4000))
		}
	})

	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 100*time.Millisecond, "dev did not come up")
	require.Eventually(t, func() bool { return strings.Contains(stdout.String(), base+"/monitor/") },
		30*time.Second, 100*time.Millisecond, "the banner says where to look")

	// A second dev on the same port fails with a clear message.
	second := exec.Command(bin, "dev", "--addr", addr)
	second.Env = cmd.Env
	out, err := second.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "already in use")

	// Every state shows, within a bound: available through the consumer
	// listing, the rest through the connection list.
	seen := map[string]bool{}
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) && len(seen) < 5 {
		var list struct{ Data []apiConn }
		getJSON(t, base+"/v1/connections?limit=500", &list)
		consumers := map[string]bool{}
		for _, c := range list.Data {
			seen[c.State] = true
			consumers[c.ConsumerID] = true
		}
		for id := range consumers {
			var consumer struct{ Data []apiConn }
			getJSON(t, base+"/v1/consumers/"+id+"/connections", &consumer)
			for _, c := range consumer.Data {
				seen[c.State] = true
			}
		}
		if len(seen) < 5 {
			time.Sleep(time.Second)
		}
	}
	require.Len(t, seen, 5, "states seen: %v", seen)

	// A refresh rotated a token, and the flaky provider caused retries.
	var metrics string
	require.Eventually(t, func() bool {
		_, metrics = getBody(t, base+"/metrics")
		return metricSum(metrics, "vaultfleet_token_refreshes_total", `outcome="refreshed"`) >= 1 &&
			metricSum(metrics, "vaultfleet_checks_total", `integration="pipedrive"`, `outcome="transient"`)+
				metricSum(metrics, "vaultfleet_checks_total", `integration="pipedrive"`, `outcome="rate_limited"`) >= 1
	}, 90*time.Second, time.Second, "no refresh or no flaky-provider retry seen")
	require.Regexp(t, regexp.MustCompile(`(?m)^vaultfleet_connections\{`), metrics)
	// ... but never an invalidation.
	require.Zero(t, metricSum(metrics, "vaultfleet_checks_total", `integration="pipedrive"`, `outcome="invalid"`))
	var list struct{ Data []apiConn }
	getJSON(t, base+"/v1/connections?service_id=pipedrive&limit=500", &list)
	require.NotEmpty(t, list.Data)
	for _, c := range list.Data {
		require.NotEqual(t, "invalid", c.State, "flaky provider invalidated %s/%s", c.ConsumerID, c.ID)
	}

	code, body := getBody(t, base+"/monitor/")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, strings.ToLower(body), "<html")
	code, body = getBody(t, base+"/")
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `id="states"`)
	screenshotStatusPage(t, base)

	// Ctrl-C exits cleanly within a few seconds.
	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	select {
	case err := <-exited:
		require.NoError(t, err, "dev exit")
	case <-time.After(15 * time.Second):
		t.Fatal("dev did not exit within 15s of SIGINT")
	}
	require.Contains(t, stdout.String(), "added=")
}

// screenshotStatusPage loads the status page in a real headless Chromium,
// checks what it rendered, and saves a screenshot as a CI artifact
// (artifacts/status-page.png at the repository root).
func screenshotStatusPage(t *testing.T, base string) {
	t.Helper()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("VAULTFLEET_SKIP_TOOLS") == "1" {
			t.Log("chromium not installed; VAULTFLEET_SKIP_TOOLS=1 skips the browser check")
			return
		}
		t.Fatal("chromium not installed: .ci/run installs it (apt-get install chromium); VAULTFLEET_SKIP_TOOLS=1 skips")
	}
	art, err := filepath.Abs(filepath.Join("..", "..", "artifacts"))
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(art, 0o755))
	shot := filepath.Join(art, "status-page.png")
	_ = os.Remove(shot)
	flags := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(), "--window-size=1280,1000"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dom, err := exec.CommandContext(ctx, chromium, append(flags, "--dump-dom", base+"/")...).Output()
	require.NoError(t, err, "chromium --dump-dom")
	page := string(dom)
	for _, want := range []string{"Connections by integration and state", `data-integration="salesforce"`,
		`data-integration="pipedrive"`, "Latest transitions", "vault.connection.", `href="/monitor/"`} {
		require.Contains(t, page, want, "rendered page")
	}
	require.NotContains(t, page, "unavailable", "the page reports a failed read")
	out, err := exec.CommandContext(ctx, chromium, append(flags, "--screenshot="+shot, base+"/")...).CombinedOutput()
	require.NoError(t, err, "chromium --screenshot: %s", out)
	st, err := os.Stat(shot)
	require.NoError(t, err)
	require.Greater(t, st.Size(), int64(10_000), "screenshot looks empty")
	t.Logf("status page screenshot: %s (%d bytes)", shot, st.Size())
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}
