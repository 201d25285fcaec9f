package events

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestStrictClientRefusesInternalAddresses checks the dial-time guard: a
// subscription without allow_insecure never reaches a loopback (or other
// internal) address, even through a name that resolves to one.
func TestStrictClientRefusesInternalAddresses(t *testing.T) {
	t.Parallel()
	var hits int
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits++ }))
	defer srv.Close()
	strict := newHTTPClient(time.Second, true)
	// "localhost" resolves to loopback: the name passes no literal check,
	// the dial check stops it.
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	for _, u := range []string{srv.URL, "http://localhost:" + port + "/"} {
		resp, err := strict.Post(u, "application/json", nil)
		if err == nil {
			resp.Body.Close()
		}
		require.True(t, errors.Is(err, errDialNotAllowed), "%s: %v", u, err)
	}
	require.Zero(t, hits)
	resp, err := newHTTPClient(time.Second, false).Post(srv.URL, "application/json", nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 1, hits)
}
