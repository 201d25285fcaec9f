package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

var (
	composeDefault  = regexp.MustCompile(`\$\{[A-Z_]+:-([^}]*)\}`)
	composeRequired = regexp.MustCompile(`\$\{[A-Z_]+:\?[^}]*\}`)
)

// TestComposeCommandsAndEnv reads docker-compose.yml (no container engine
// runs here) and, for every service built from this repository, runs
// `vaultfleet <command> --help` and checks that every environment variable
// the service sets is one the binary reads and that its values read.
func TestComposeCommandsAndEnv(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join("..", "..", "docker-compose.yml"))
	require.NoError(t, err)
	var doc struct {
		Services map[string]struct {
			Build       any               `yaml:"build"`
			Command     []string          `yaml:"command"`
			Environment map[string]string `yaml:"environment"`
		} `yaml:"services"`
	}
	require.NoError(t, yaml.Unmarshal(raw, &doc), "docker-compose.yml parses (merge keys included)")
	names := make([]string, 0, len(doc.Services))
	for n := range doc.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	commandsSeen := map[string]int{}
	for _, name := range names {
		svc := doc.Services[name]
		if svc.Build == nil {
			continue // redis, prometheus, grafana
		}
		require.NotEmpty(t, svc.Command, "service %s has no command", name)
		sub := svc.Command[0]
		commandsSeen[sub]++
		var out bytes.Buffer
		code := run(context.Background(), []string{sub, "--help"}, Env{Getenv: func(string) string { return "" }, Stdout: &out, Stderr: &out})
		require.Equal(t, 0, code, "service %s: vaultfleet %s --help: %s", name, sub, out.String())
		require.Contains(t, out.String(), "usage: vaultfleet "+sub, "service %s", name)
		vars := map[string]string{}
		for k, v := range svc.Environment {
			require.True(t, knownEnv(k), "service %s sets %s, which vaultfleet does not read", name, k)
			require.Contains(t, out.String(), k, "service %s: %s is not documented in 'vaultfleet %s --help'", name, k, sub)
			// ${X:-default} reads as its default; ${X:?message} (a secret
			// the operator must set) as a placeholder.
			v = composeDefault.ReplaceAllString(v, "$1")
			vars[k] = composeRequired.ReplaceAllString(v, "set-by-the-operator")
		}
		env, _, _ := testEnv(vars)
		cfg := newConfig(sub, sub, "", env)
		require.NoError(t, cfg.parse(svc.Command[1:]), "service %s: its configuration reads", name)
	}
	require.Equal(t, 3, commandsSeen["worker"], "three workers")
	require.Equal(t, 2, commandsSeen["scheduler"], "two schedulers")
	require.Equal(t, 1, commandsSeen["serve"], "one serve")
}
