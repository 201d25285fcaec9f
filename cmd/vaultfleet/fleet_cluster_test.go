package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
)

// TestFleetOnCluster runs serve, worker and scheduler with
// REDIS_URL=redis-cluster://host:port,host:port,host:port (the README's
// form) on a local three-master Redis Cluster: 24 API-key connections
// written through the API become callable or invalid as an httptest
// provider says, and the fleet's event stream records it.
func TestFleetOnCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster and three processes")
	}
	cl := redistest.NewCluster(t) // this package has no redistest.Main

	require.True(t, strings.HasPrefix(cl.URL(), "redis-cluster://") && strings.Count(cl.URL(), ",") == 2, cl.URL())
	f := startAPIFleet(t, cl.URL())
	serve, wk, sch, procs, api := f.serve, f.worker, f.scheduler, f.procs, f.api(t)
	const n = 24
	want := map[string]string{}
	for i := range n {
		consumer, key, state := fmt.Sprintf("cluster-%02d", i), fleetGoodKey, "callable"
		if i%3 == 0 {
			key, state = fmt.Sprintf("bad-key-%02d", i), "invalid"
		}
		want[consumer] = state
		code, body := api("PUT", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", `{"credentials":{"api_key":"`+key+`"}}`)
		require.Equal(t, http.StatusCreated, code, body)
	}
	require.Eventually(t, func() bool {
		for consumer, state := range want {
			_, body := api("GET", "/v1/consumers/"+consumer+"/connections/crm/pipedrive", "")
			var v struct{ Data struct{ State string } }
			if json.Unmarshal([]byte(body), &v) != nil || v.Data.State != state {
				return false
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "not every connection reached its state: %s", tail(wk.stderr.String(), 2000))
	require.Contains(t, scrape(t, serve.addr), `vaultfleet_connections{integration="pipedrive",state="callable"} 16`)
	require.Contains(t, scrape(t, serve.addr), `vaultfleet_connections{integration="pipedrive",state="invalid"} 8`)

	// The scheduler sweeps the cluster without errors.
	for _, p := range procs {
		require.NotContains(t, p.stderr.String(), `"level":"ERROR"`, "%s logged an error", p.name)
	}
	require.NotContains(t, sch.stderr.String(), "sweep failed")
}
