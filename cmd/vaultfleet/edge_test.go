package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// startTestOps serves the ops routes plus a body-reading route (as the
// API's PUT is) and a route that refuses without reading (as a failed
// authentication does) on a fresh loopback listener.
func startTestOps(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := serveOpsOn(ctx, ln, prometheus.NewRegistry(), func(context.Context) error { return nil },
		slog.New(slog.DiscardHandler), func(mux *http.ServeMux) {
			mux.HandleFunc("PUT /body", func(w http.ResponseWriter, r *http.Request) {
				if _, err := io.ReadAll(r.Body); err != nil {
					http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
					return
				}
				_, _ = io.WriteString(w, "read\n")
			})
			mux.HandleFunc("POST /auth", func(w http.ResponseWriter, _ *http.Request) {
				http.Error(w, "unauthorized", http.StatusUnauthorized)
			})
		})
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return ln.Addr().String()
}

// closedWithin reads c until the server closes it and fails unless that
// happens within d; it returns what the server sent.
func closedWithin(t *testing.T, c net.Conn, d time.Duration) string {
	t.Helper()
	start := time.Now()
	require.NoError(t, c.SetReadDeadline(start.Add(d)))
	var got strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		got.Write(buf[:n])
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the server kept the connection open for %s (sent %q)", time.Since(start).Round(time.Millisecond), got.String())
		}
		return got.String()
	}
}

func dialRaw(t *testing.T, addr, req string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	_, err = io.WriteString(c, req)
	require.NoError(t, err)
	return c
}

// TestServerTimeouts: a client that declares a body and sends nothing is
// cut off after the read timeout, an idle keep-alive connection is closed
// after the idle timeout, and a refused request's declared body is never
// waited for.
func TestServerTimeouts(t *testing.T) {
	// serverLimits is package state: this test is not parallel, and
	// parallel tests start only after it has restored the limits.
	saved := serverLimits
	serverLimits = httpLimits{readHeader: 300 * time.Millisecond, read: 500 * time.Millisecond,
		write: 2 * time.Second, idle: 500 * time.Millisecond}
	t.Cleanup(func() { serverLimits = saved })
	addr := startTestOps(t)

	t.Run("SlowBodyCutOff", func(t *testing.T) {
		c := dialRaw(t, addr, "PUT /body HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
		closedWithin(t, c, 3*time.Second)
	})
	t.Run("IdleKeepAliveClosed", func(t *testing.T) {
		c := dialRaw(t, addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.False(t, resp.Close, "a keep-alive connection")
		start := time.Now()
		require.NoError(t, c.SetReadDeadline(start.Add(3*time.Second)))
		_, err = br.ReadByte()
		require.ErrorIs(t, err, io.EOF, "closed by the server after %s", time.Since(start))
	})
}

// TestRefusedBodyNotAwaited: with the production limits, a refused request
// that declared a body gets its answer and the connection is closed at
// once: the server neither reads nor waits for the body.
func TestRefusedBodyNotAwaited(t *testing.T) {
	t.Parallel()
	addr := startTestOps(t)
	c := dialRaw(t, addr, "POST /auth HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
	got := closedWithin(t, c, 2*time.Second)
	require.True(t, strings.HasPrefix(got, "HTTP/1.1 401"), got)
	require.Contains(t, got, "Connection: close")
}

func TestLoopbackHost(t *testing.T) {
	t.Parallel()
	for host, want := range map[string]bool{
		"localhost": true, "LOCALHOST:8080": true, "127.0.0.1": true, "127.0.0.1:8080": true,
		"[::1]": true, "[::1]:8080": true, "127.0.0.2:80": true,
		"": false, "evil.example": false, "evil.example:8080": false, "localhost.evil.example:8080": false,
		"10.0.0.1:8080": false, "[fe80::1%25eth0]:80": false, "0.0.0.0:8080": false, "[::]:8080": false,
		"localhost.:8080": false,
	} {
		require.Equal(t, want, loopbackHost(host), host)
	}
}

// TestDevRefusesForeignHost runs dev without tokens (open API on
// loopback): a request naming another host, as a DNS-rebound page would,
// gets 421 on every route; loopback names work.
func TestDevRefusesForeignHost(t *testing.T) {
	if testing.Short() {
		t.Skip("runs dev")
	}
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	addr := freeAddr(t)
	env, out, errOut := testEnv(map[string]string{})
	code := make(chan int, 1)
	go func() { code <- run(ctx, []string{"dev", "--addr", addr, "--summary", "0"}, env) }()
	t.Cleanup(func() {
		cancel()
		select {
		case c := <-code:
			require.Equal(t, 0, c, errOut.String())
		case <-time.After(20 * time.Second):
			t.Error("dev did not stop")
		}
	})
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "/monitor/") },
		30*time.Second, 50*time.Millisecond, "dev did not start: %s", errOut)
	_, port, _ := net.SplitHostPort(addr)
	get := func(host, path string) int {
		req, err := http.NewRequest(http.MethodGet, "http://"+addr+path, nil)
		require.NoError(t, err)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, path := range []string{"/v1/connections?limit=1", "/monitor/", "/", "/metrics"} {
		require.Equal(t, http.StatusMisdirectedRequest, get("rebound.evil.example:"+port, path), path)
		require.Equal(t, http.StatusMisdirectedRequest, get("rebound.evil.example", path), path)
		require.Equal(t, http.StatusOK, get("localhost:"+port, path), path)
		require.Equal(t, http.StatusOK, get("127.0.0.1:"+port, path), path)
	}
}
