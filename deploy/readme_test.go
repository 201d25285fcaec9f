package deploy

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var (
	// codeMetricRE matches a vaultfleet metric name written as a Go string.
	codeMetricRE = regexp.MustCompile(`"(vaultfleet_[a-z0-9_]+)"`)
	// readmeMetricRE matches a metric name in a backticked cell, label
	// sets ({a,b}) removed first.
	readmeMetricRE = regexp.MustCompile(`vaultfleet_[a-z0-9_]+`)
	labelSetRE     = regexp.MustCompile(`\{[^}]*\}`)
	backtickRE     = regexp.MustCompile("`[^`]*`")
)

// readmeMetrics returns the vaultfleet_* names in the first column of the
// README's metrics table (section "### Metrics").
func readmeMetrics(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "README.md"))
	require.NoError(t, err)
	_, section, ok := strings.Cut(string(b), "\n### Metrics\n")
	require.True(t, ok, "README.md has no ### Metrics section")
	if i := strings.Index(section, "\n#"); i >= 0 {
		section = section[:i]
	}
	var out []string
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		first := strings.Split(line, "|")[1]
		for _, cell := range backtickRE.FindAllString(first, -1) {
			out = append(out, readmeMetricRE.FindAllString(labelSetRE.ReplaceAllString(cell, ""), -1)...)
		}
	}
	require.NotEmpty(t, out, "no metric rows in the README's metrics table")
	slices.Sort(out)
	return slices.Compact(out)
}

// TestReadmeMetricsTable: the README's metrics table names exactly the
// vaultfleet_* families of deploy/metrics.txt (which the fleet test checks
// against real scrapes), and every vaultfleet_* name the code defines is
// listed, including families only some configurations export (the webhook
// relay's runs only with subscriptions).
func TestReadmeMetricsTable(t *testing.T) {
	t.Parallel()
	var listed []string
	for name := range loadMetrics(t) {
		if strings.HasPrefix(name, "vaultfleet_") {
			listed = append(listed, name)
		}
	}
	slices.Sort(listed)
	inReadme := readmeMetrics(t)
	for _, name := range listed {
		require.Contains(t, inReadme, name, "deploy/metrics.txt lists %s; the README's metrics table does not", name)
	}
	for _, name := range inReadme {
		require.Contains(t, listed, name, "the README's metrics table names %s; deploy/metrics.txt does not list it", name)
	}

	defined := map[string]string{}
	err := filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "node_modules" || d.Name() == "artifacts") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range codeMetricRE.FindAllStringSubmatch(string(src), -1) {
			defined[m[1]] = path
		}
		return nil
	})
	require.NoError(t, err)
	require.NotEmpty(t, defined)
	for name, path := range defined {
		require.Contains(t, listed, name, "%s defines %s; deploy/metrics.txt and the README do not list it", path, name)
	}
}
