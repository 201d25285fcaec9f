package state

import (
	"context"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/vaultfleet/vaultfleet/internal/redistest"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
)

// repoScript is one Lua script of the repository.
type repoScript struct {
	name string // where it is defined
	src  string
}

// repoScripts enumerates every Lua script of the repository: each .lua
// file outside testdata, and each argument of redis.NewScript or of an
// Eval call in Go code (a string literal, or a variable filled by
// //go:embed from a .lua file). An argument it cannot resolve fails the
// test, so a new kind of script cannot slip past the key check.
func repoScripts(t *testing.T) []repoScript {
	t.Helper()
	root := filepath.Join("..")
	seen := map[string]bool{}
	var out []repoScript
	add := func(name, src string) {
		if sha := redistest.SHA1(src); !seen[sha] {
			seen[sha] = true
			out = append(out, repoScript{name: name, src: src})
		}
	}
	type call struct {
		pos  token.Position
		dir  string
		expr ast.Expr
	}
	var calls []call
	embeds := map[string]string{} // dir + "." + var -> file
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case "testdata", "node_modules", "vendor", ".git":
				return filepath.SkipDir
			}
			return nil
		}
		switch {
		case strings.HasSuffix(path, ".lua"):
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			add(path, string(b))
		case strings.HasSuffix(path, ".go") && !strings.HasSuffix(path, "_test.go"):
			f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
			if err != nil {
				return err
			}
			dir := filepath.Dir(path)
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.GenDecl:
					for _, spec := range n.Specs {
						vs, ok := spec.(*ast.ValueSpec)
						if !ok {
							continue
						}
						doc := vs.Doc
						if doc == nil && len(n.Specs) == 1 {
							doc = n.Doc
						}
						if doc == nil {
							continue
						}
						for _, c := range doc.List {
							if file, ok := strings.CutPrefix(c.Text, "//go:embed "); ok {
								for _, name := range vs.Names {
									embeds[dir+"."+name.Name] = filepath.Join(dir, strings.TrimSpace(file))
								}
							}
						}
					}
				case *ast.CallExpr:
					sel, ok := n.Fun.(*ast.SelectorExpr)
					if !ok {
						return true
					}
					switch sel.Sel.Name {
					case "NewScript":
						if len(n.Args) == 1 {
							calls = append(calls, call{fset.Position(n.Pos()), dir, n.Args[0]})
						}
					case "Eval", "EvalRO":
						if len(n.Args) >= 2 {
							calls = append(calls, call{fset.Position(n.Pos()), dir, n.Args[1]})
						}
					}
				}
				return true
			})
		}
		return nil
	})
	require.NoError(t, err)
	for _, c := range calls {
		switch e := c.expr.(type) {
		case *ast.BasicLit:
			s, err := strconv.Unquote(e.Value)
			require.NoError(t, err, c.pos)
			add(c.pos.String(), s)
		case *ast.Ident:
			file, ok := embeds[c.dir+"."+e.Name]
			require.True(t, ok, "%s: script %s is neither a literal nor a //go:embed variable; teach repoScripts about it", c.pos, e.Name)
			b, err := os.ReadFile(file)
			require.NoError(t, err)
			add(file, string(b))
		default:
			t.Fatalf("%s: cannot enumerate this script argument; teach repoScripts about it", c.pos)
		}
	}
	return out
}

// TestEveryScriptDeclaresItsKeys runs every Lua script of the repository
// against a private redis-server, through the store's real operations
// (and the worker's wave guard with its real key), while MONITOR records
// each command the scripts run; every key those commands touch must be
// among the script's KEYS. Redis Cluster refuses undeclared keys while a
// slot migrates, Dragonfly always.
func TestEveryScriptDeclaresItsKeys(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	if !srv.Real {
		t.Skip("needs redis-server (MONITOR, COMMAND GETKEYS)")
	}
	scripts := repoScripts(t)
	require.GreaterOrEqual(t, len(scripts), 10, "found: %v", scripts)

	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	keys, err := secrets.ParseKeyring(secrets.NewKey("k1"))
	require.NoError(t, err)
	clock := &testClock{now: storeT0}
	st, err := New(Config{Client: rdb, Catalog: storeCatalog(t), Keys: keys, NowFunc: clock.Now, Shards: 2})
	require.NoError(t, err)
	ctx := context.Background()
	watch := redistest.WatchScripts(t, srv.Addr)

	// Connections: created, changed, verdicts, transient, refresh fence,
	// tokens, enabled, deleted.
	_, err = st.CreateConsumer(ctx, "c1", json.RawMessage(`{"name":"Acme"}`))
	require.NoError(t, err)
	_, err = st.UpdateConsumer(ctx, "c1", json.RawMessage(`{"name":"Acme 2"}`))
	require.NoError(t, err)
	_, err = st.EnsureConsumer(ctx, "c2")
	require.NoError(t, err)
	ch, err := st.Put(ctx, refBamboo, bambooInput("k"), 0)
	require.NoError(t, err)
	_, err = st.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err)
	clock.now = clock.now.Add(time.Hour)
	_, err = st.ApplyVerdict(ctx, refBamboo, ch.After.Revision, Verdict{Outcome: OutcomeValid, Reason: ReasonCheckPassed, HTTPStatus: 200})
	require.NoError(t, err) // unchanged: touch.lua
	_, err = st.RecordTransient(ctx, refBamboo, ch.After.Revision, "503")
	require.NoError(t, err)
	_, err = st.Patch(ctx, refBamboo, Input{Credentials: map[string]string{"api_key": "k2"}}, 0)
	require.NoError(t, err)
	_, err = st.SetEnabled(ctx, refBamboo, false, 0)
	require.NoError(t, err)
	_, err = st.SetEnabled(ctx, refBamboo, true, 0)
	require.NoError(t, err)

	_, err = st.Put(ctx, refSF, sfInput("at", "rt", storeT0.Add(time.Hour)), 0)
	require.NoError(t, err)
	l, err := st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	require.NoError(t, st.ExtendRefresh(ctx, l, 2*time.Minute))
	_, err = st.BeginExchange(ctx, l, Lineage("rt"), time.Minute)
	require.NoError(t, err)
	_, err = st.StoreRefreshedTokens(ctx, l, "rt", Tokens{AccessToken: "at2", RefreshToken: "rt2", ExpiresAt: storeT0.Add(2 * time.Hour)})
	require.NoError(t, err)
	_, err = st.BeginExchange(ctx, l, Lineage("rt2"), time.Minute)
	require.NoError(t, err)
	require.NoError(t, st.SettleExchange(ctx, l, false))
	_, err = st.BeginExchange(ctx, l, Lineage("rt2"), time.Minute)
	require.NoError(t, err)
	seen, err := st.Get(ctx, refSF)
	require.NoError(t, err)
	_, err = st.RevokeRefresh(ctx, l, seen, Verdict{Reason: ReasonRefreshTokenRevoked})
	require.NoError(t, err)
	require.NoError(t, st.ReleaseRefresh(ctx, l))
	l, err = st.AcquireRefresh(ctx, refSF, time.Minute)
	require.NoError(t, err)
	st.abandonExchange(ctx, l) // what BeginExchange sends when its reply is lost
	_, err = st.Put(ctx, refXero, Input{Credentials: map[string]string{"access_token": "a", "refresh_token": "r",
		"expires_at": storeT0.Add(time.Hour).Format(time.RFC3339)}}, 0)
	require.NoError(t, err)
	_, err = st.Delete(ctx, refXero, 0)
	require.NoError(t, err)

	// Claims (with a member whose record is gone) and reschedules.
	require.NoError(t, rdb.ZAdd(ctx, st.keysOf(refBamboo).due(IndexCheck), redis.Z{Score: 1, Member: "ghost|hris+bamboohr"}).Err())
	var claims []Claim
	for sh := range st.Shards() {
		for _, idx := range []Index{IndexCheck, IndexRefresh} {
			cs, err := st.ClaimDue(ctx, idx, sh, storeT0.Add(24*time.Hour), time.Minute, 100)
			require.NoError(t, err)
			if idx == IndexCheck {
				claims = append(claims, cs...)
			}
			_, err = st.ClaimDue(ctx, idx, sh, time.Time{}, time.Minute, 100) // at Redis TIME
			require.NoError(t, err)
		}
	}
	require.NotEmpty(t, claims)
	_, err = st.RescheduleClaim(ctx, IndexCheck, claims[0], storeT0.Add(2*time.Hour))
	require.NoError(t, err)
	next := make([]time.Time, len(claims))
	for i := range next {
		next[i] = storeT0.Add(3 * time.Hour)
	}
	_, err = st.RescheduleBatch(ctx, IndexCheck, claims, next)
	require.NoError(t, err)

	// Every connection of a consumer, and the consumer, at once.
	_, err = st.DeleteConsumer(ctx, "c1")
	require.NoError(t, err)

	// The worker's invalid-wave guard, through its door type.
	wave := NewWaveCounter(rdb, DefaultPrefix)
	for i := range 3 {
		_, err := wave.Admit(ctx, "bamboohr", "c1|hris+bamboohr|"+strconv.Itoa(i), time.Now(), time.Minute, 2)
		require.NoError(t, err)
	}

	rep := watch.Report(t)
	for _, v := range rep.Violations {
		t.Errorf("%s: %s", scriptName(scripts, v.SHA), v)
	}
	for _, s := range scripts {
		require.Positive(t, rep.Runs[redistest.SHA1(s.src)], "script %s never ran in this test: give it an operation", s.name)
	}
	t.Logf("%d scripts checked: %v", len(scripts), scriptNames(scripts))
}

// TestScriptKeyCheckCatchesUndeclaredKeys: the check above fails on the
// claim script as it was (record keys built from a prefix in ARGV).
func TestScriptKeyCheckCatchesUndeclaredKeys(t *testing.T) {
	t.Parallel()
	srv := redistest.New(t)
	if !srv.Real {
		t.Skip("needs redis-server (MONITOR, COMMAND GETKEYS)")
	}
	old, err := os.ReadFile(filepath.Join("testdata", "claim_undeclared.lua"))
	require.NoError(t, err)
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := context.Background()
	const due, rec = "vf:{s00}:due:check", "vf:{s00}:conn:c1|hris+bamboohr"
	require.NoError(t, rdb.ZAdd(ctx, due, redis.Z{Score: 1, Member: "c1|hris+bamboohr"}).Err())
	require.NoError(t, rdb.HSet(ctx, rec, "svc", "bamboohr", "st", "added").Err())
	watch := redistest.WatchScripts(t, srv.Addr)
	require.NoError(t, redis.NewScript(string(old)).Run(ctx, rdb, []string{due}, 10, 100, 10, "vf:{s00}:conn:").Err())
	rep := watch.Report(t)
	require.Len(t, rep.Violations, 1, "%v", rep.Violations)
	require.Equal(t, rec, rep.Violations[0].Key)
	require.Equal(t, "HMGET", rep.Violations[0].Command[0])
}

func scriptName(scripts []repoScript, sha string) string {
	for _, s := range scripts {
		if redistest.SHA1(s.src) == sha {
			return s.name
		}
	}
	return "unknown script " + sha
}

func scriptNames(scripts []repoScript) []string {
	out := make([]string, len(scripts))
	for i, s := range scripts {
		out[i] = s.name
	}
	return out
}
