package state

import (
	"go/build"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// state is the one Redis door: every Lua script and key layout of the
// fleet's own data lives here. These tests keep it that way.

// TestEveryScriptIsAFileUnderLua: each script is a file of state/lua (so
// one walk of that directory finds them all, e.g. to check the keys they
// declare), and each file is embedded by a script of the package.
func TestEveryScriptIsAFileUnderLua(t *testing.T) {
	files, err := filepath.Glob("lua/*.lua")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	src := goSources(t, ".", false)
	var embedded []string
	embedRE := regexp.MustCompile(`//go:embed (lua/\S+\.lua)`)
	for _, b := range src {
		for _, m := range embedRE.FindAllStringSubmatch(b, -1) {
			embedded = append(embedded, m[1])
		}
		require.NotRegexp(t, "redis\\.NewScript\\(`", b, "a script written inline: move it to lua/")
	}
	for _, f := range files {
		require.Contains(t, embedded, filepath.ToSlash(f), "%s is not used by any script", f)
	}
}

// goRedisImporters are the packages whose production code may import
// go-redis, and why. Everything else reaches Redis through state's types,
// behind interfaces it declares itself.
var goRedisImporters = map[string]string{
	"state":              "the door itself",
	"cmd/vaultfleet":     "builds the client from REDIS_URL and hands it to state and asynq; the fleet marker",
	"worker":             "Config.Redis is asynq's connection (asynq needs a go-redis client); the worker's own keys go through state",
	"internal/monitor":   "asynqmon takes the go-redis client",
	"internal/redistest": "test helper: starts Redis servers and hands out clients",
	"internal/simtest":   "test helper: builds a store on a test Redis",
	"internal/bench":     "the bench measures Redis itself (INFO cpu, commandstats, memory; a round-trip counting hook) and builds asynq clients",
}

func TestOnlyTheDoorAndAsynqsWiringImportGoRedis(t *testing.T) {
	var got []string
	root := filepath.Join("..")
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); n != ".." && (strings.HasPrefix(n, ".") || n == "node_modules" || n == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		if ok, err := build.Default.MatchFile(filepath.Dir(path), d.Name()); err != nil || !ok {
			return err // not built (tools.go pins modules under a build tag)
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		for _, im := range f.Imports {
			p, _ := strconv.Unquote(im.Path.Value)
			if strings.HasPrefix(p, "github.com/redis/go-redis/") || strings.HasPrefix(p, "github.com/go-redis/") {
				rel, _ := filepath.Rel(root, filepath.Dir(path))
				got = append(got, filepath.ToSlash(rel))
			}
		}
		return nil
	})
	require.NoError(t, err)
	slices.Sort(got)
	got = slices.Compact(got)
	for _, p := range got {
		_, ok := goRedisImporters[p]
		require.True(t, ok, "%s imports go-redis: reach Redis through state's types (or list it in goRedisImporters with the reason)", p)
	}
}

// goSources returns the Go files of dir, with or without tests.
func goSources(t *testing.T, dir string, tests bool) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var out []string
	for _, e := range entries {
		n := e.Name()
		if !strings.HasSuffix(n, ".go") || (!tests && strings.HasSuffix(n, "_test.go")) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		require.NoError(t, err)
		out = append(out, string(b))
	}
	return out
}
