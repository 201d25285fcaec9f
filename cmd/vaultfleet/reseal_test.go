package main

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

// TestResealCommand rotates keys the way the README says: records written
// under the old key, `vaultfleet reseal` with new,old, then everything
// opens with the new key alone. A second run rewrites nothing; a record
// no key opens makes it exit 1 and is listed by id.
func TestResealCommand(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	cat, err := catalog.Default()
	require.NoError(t, err)
	open := func(spec string) *state.Store {
		keys, err := secrets.ParseKeyring(spec)
		require.NoError(t, err)
		st, err := state.New(state.Config{Client: rdb, Catalog: cat, Keys: keys})
		require.NoError(t, err)
		return st
	}
	const n = 30
	const secret = "old-key-secret-value"
	old := open(testKeys)
	for i := range n {
		_, err := old.Put(ctx, state.Ref{ConsumerID: fmt.Sprintf("rs%02d", i), ConnectionID: "crm+pipedrive"},
			state.Input{Credentials: map[string]string{"api_key": fmt.Sprintf("%s-%d", secret, i)}}, 0)
		require.NoError(t, err)
	}
	newKey := secrets.NewKey("k2")
	reseal := func(keys string) (int, string, string) {
		env, out, errOut := testEnv(map[string]string{envRedisURL: "redis://" + srv.Addr + "/0", secrets.EnvKeys: keys})
		code := run(ctx, []string{"reseal", "--progress", "0"}, env)
		require.NotContains(t, out.String()+errOut.String(), secret)
		return code, out.String(), errOut.String()
	}
	done := regexp.MustCompile(`(?m)^reseal: done: shard 16/16 scanned=(\d+) resealed=(\d+) current=(\d+) unreadable=(\d+) failed=(\d+) `)

	code, out, errOut := reseal(newKey + "," + testKeys)
	require.Equal(t, 0, code, errOut)
	require.Contains(t, out, `under key "k2"`)
	require.Equal(t, []string{fmt.Sprint(n), fmt.Sprint(n), "0", "0", "0"}, done.FindStringSubmatch(out)[1:], out)

	s := open(newKey)
	for i := range n {
		c, err := s.Get(ctx, state.Ref{ConsumerID: fmt.Sprintf("rs%02d", i), ConnectionID: "crm+pipedrive"})
		require.NoError(t, err)
		require.Equal(t, fmt.Sprintf("%s-%d", secret, i), c.Credentials.APIKey)
	}

	// Again: nothing to do.
	code, out, errOut = reseal(newKey + "," + testKeys)
	require.Equal(t, 0, code, errOut)
	require.Equal(t, []string{fmt.Sprint(n), "0", fmt.Sprint(n), "0", "0"}, done.FindStringSubmatch(out)[1:], out)

	// A record sealed with a key nobody has any more: exit 1, its id
	// listed, the others untouched.
	lost := state.Ref{ConsumerID: "lost-one", ConnectionID: "crm+pipedrive"}
	_, err = open(secrets.NewKey("k0")).Put(ctx, lost, state.Input{Credentials: map[string]string{"api_key": secret}}, 0)
	require.NoError(t, err)
	code, out, errOut = reseal(newKey + "," + testKeys)
	require.Equal(t, 1, code)
	require.Contains(t, out, "unreadable: "+lost.String()+"\n")
	require.Equal(t, []string{fmt.Sprint(n + 1), "0", fmt.Sprint(n), "1", "0"}, done.FindStringSubmatch(out)[1:], out)
	require.Contains(t, errOut, "1 record(s) cannot be opened")
	require.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
}

func TestResealErrors(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		vars    map[string]string
		args    []string
		code    int
		wantErr string
	}{
		"NoKeys":      {vars: map[string]string{envRedisURL: "redis://127.0.0.1:1/0"}, code: 1, wantErr: "no encryption key"},
		"RedisDown":   {vars: map[string]string{envRedisURL: "redis://127.0.0.1:1/0", secrets.EnvKeys: testKeys}, code: 1, wantErr: "redis unreachable"},
		"ExtraArg":    {args: []string{"now"}, code: 2, wantErr: `unexpected argument "now"`},
		"UnknownFlag": {args: []string{"--addr", ":0"}, code: 2, wantErr: "flag provided but not defined: -addr"},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			env, _, errOut := testEnv(tc.vars)
			require.Equal(t, tc.code, run(context.Background(), append([]string{"reseal"}, tc.args...), env), errOut.String())
			require.Contains(t, errOut.String(), tc.wantErr)
		})
	}
	env, _, errOut := testEnv(nil)
	require.Equal(t, 0, run(context.Background(), []string{"reseal", "--help"}, env))
	require.Contains(t, errOut.String(), "FIRST key of "+secrets.EnvKeys)
}
