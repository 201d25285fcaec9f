package main

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var updateREADME = flag.Bool("update-readme", false, "rewrite the README's configuration table from the settings table")

const (
	readmeBegin = "<!-- BEGIN configuration table: generated from cmd/vaultfleet/settings.go by `go test ./cmd/vaultfleet -run TestREADMEConfigTable -update-readme` -->\n"
	readmeEnd   = "<!-- END configuration table -->\n"
)

// TestREADMEConfigTable keeps the README's configuration table what the
// settings table says: every variable and flag, its kind and default.
func TestREADMEConfigTable(t *testing.T) {
	path := filepath.Join("..", "..", "README.md")
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	doc := string(raw)
	i, j := strings.Index(doc, readmeBegin), strings.Index(doc, readmeEnd)
	require.True(t, i >= 0 && j > i, "README.md has the markers of the configuration table")
	want := doc[:i+len(readmeBegin)] + readmeTable() + doc[j:]
	if *updateREADME {
		require.NoError(t, os.WriteFile(path, []byte(want), 0o644))
		return
	}
	require.Equal(t, want, doc, "README.md's configuration table differs from settings.go: run go test ./cmd/vaultfleet -run TestREADMEConfigTable -update-readme")
}
