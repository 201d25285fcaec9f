package api_test

import (
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"

	"github.com/vaultfleet/vaultfleet/internal/api"
)

// openAPIDoc is the part of the document the tests read.
type openAPIDoc struct {
	OpenAPI string                                 `yaml:"openapi"`
	Paths   map[string]map[string]openAPIOperation `yaml:"paths"`
	raw     map[string]any
}

type openAPIOperation struct {
	Responses map[string]any `yaml:"responses"`
	Security  *[]any         `yaml:"security"`
}

var httpMethods = []string{"get", "put", "post", "delete", "patch", "head", "options", "trace"}

func loadOpenAPI(t testing.TB, data []byte) openAPIDoc {
	t.Helper()
	var raw map[string]any
	require.NoError(t, yaml.Unmarshal(data, &raw))
	// Path items also hold "parameters": decode operations by method only.
	var doc struct {
		OpenAPI string                    `yaml:"openapi"`
		Paths   map[string]map[string]any `yaml:"paths"`
	}
	require.NoError(t, yaml.Unmarshal(data, &doc))
	out := openAPIDoc{OpenAPI: doc.OpenAPI, Paths: map[string]map[string]openAPIOperation{}, raw: raw}
	for p, item := range doc.Paths {
		out.Paths[p] = map[string]openAPIOperation{}
		for k, v := range item {
			if !slices.Contains(httpMethods, k) {
				continue
			}
			b, err := yaml.Marshal(v)
			require.NoError(t, err)
			var op openAPIOperation
			require.NoError(t, yaml.Unmarshal(b, &op))
			out.Paths[p][strings.ToUpper(k)] = op
		}
	}
	return out
}

// statuses lists the documented response codes of an operation.
func (d openAPIDoc) statuses(method, path string) []int {
	var out []int
	for code := range d.Paths[path][method].Responses {
		n, _ := strconv.Atoi(code)
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

// patternOf finds the documented path a concrete path matches.
func (d openAPIDoc) patternOf(path string) string {
	path, _, _ = strings.Cut(path, "?")
	segs := strings.Split(path, "/")
	for p := range d.Paths {
		ps := strings.Split(p, "/")
		if len(ps) != len(segs) {
			continue
		}
		ok := true
		for i := range ps {
			if !strings.HasPrefix(ps[i], "{") && ps[i] != segs[i] {
				ok = false
				break
			}
		}
		if ok {
			return p
		}
	}
	return ""
}

// checkRefs fails on any $ref that does not resolve.
func checkRefs(t *testing.T, root map[string]any, node any) {
	switch n := node.(type) {
	case map[string]any:
		for k, v := range n {
			if k == "$ref" {
				ref, _ := v.(string)
				require.True(t, strings.HasPrefix(ref, "#/"), "external ref %q", ref)
				var cur any = root
				for _, part := range strings.Split(strings.TrimPrefix(ref, "#/"), "/") {
					m, ok := cur.(map[string]any)
					require.True(t, ok, "ref %q does not resolve", ref)
					cur, ok = m[part]
					require.True(t, ok, "ref %q does not resolve", ref)
				}
				continue
			}
			checkRefs(t, root, v)
		}
	case []any:
		for _, v := range n {
			checkRefs(t, root, v)
		}
	}
}

func TestOpenAPIDocumentMatchesRoutes(t *testing.T) {
	t.Parallel()
	b := setup(t)

	// The served document is the embedded one.
	r := b.req(t, "GET", "/openapi.yaml", "", "Authorization:")
	require.Equal(t, http.StatusOK, r.status)
	require.Equal(t, "application/yaml", r.header.Get("Content-Type"))
	require.Equal(t, api.OpenAPI(), r.body)
	doc := loadOpenAPI(t, r.body)
	require.True(t, strings.HasPrefix(doc.OpenAPI, "3.0"), doc.OpenAPI)
	checkRefs(t, doc.raw, doc.raw)

	// Every route the handler serves is documented, and nothing else.
	var documented []string
	for p, ops := range doc.Paths {
		for m := range ops {
			documented = append(documented, m+" "+p)
		}
	}
	routes := append(api.Routes(), api.VaultRoutes()...)
	sort.Strings(documented)
	sort.Strings(routes)
	require.Equal(t, routes, documented)

	// Every documented operation is routed and answers with a status the
	// document lists for it: with a token, and (for /v1) without one.
	const consumer = "openapi-c1"
	require.Equal(t, http.StatusCreated,
		b.req(t, "PUT", connPath(consumer, "crm", "pipedrive"), `{"credentials":{"api_key":"k"}}`).status)
	concrete := func(p string) string {
		return strings.NewReplacer("{consumer_id}", consumer, "{unified_api}", "crm", "{service_id}", "pipedrive").Replace(p)
	}
	order := map[string]int{"GET": 0, "PUT": 1, "PATCH": 2, "POST": 3, "DELETE": 4}
	sort.Slice(documented, func(i, j int) bool {
		mi, _, _ := strings.Cut(documented[i], " ")
		mj, _, _ := strings.Cut(documented[j], " ")
		if order[mi] != order[mj] {
			return order[mi] < order[mj]
		}
		return documented[i] < documented[j]
	})
	seen := map[int]bool{}
	for _, op := range documented {
		method, p, _ := strings.Cut(op, " ")
		body := ""
		if method == "PUT" || method == "PATCH" {
			body = `{"enabled":true}`
		}
		want := doc.statuses(method, p)
		r := b.req(t, method, concrete(p), body)
		require.Contains(t, want, r.status, "%s answered %d, documented %v: %s", op, r.status, want, r.body)
		seen[r.status] = true
		if strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/vault/") {
			require.Nil(t, doc.Paths[p][method].Security, "%s must not override security", op)
			r := b.req(t, method, concrete(p), body, "Authorization:")
			require.Equal(t, http.StatusUnauthorized, r.status)
			require.Contains(t, want, http.StatusUnauthorized, "%s does not document 401", op)
		} else {
			require.NotNil(t, doc.Paths[p][method].Security, "%s should say it needs no token", op)
		}
	}
	require.True(t, seen[http.StatusOK] && seen[http.StatusAccepted] && seen[http.StatusUnprocessableEntity], "%v", seen)
}

// TestErrorStatusesDocumented replays the error cases' statuses against the
// document: every status an operation can answer is listed for it.
func TestErrorStatusesDocumented(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t, api.OpenAPI())
	cases := []struct {
		method, path string
		status       int
	}{
		{"PUT", connPath("c", "crm", "pipedrive"), 400},
		{"PUT", connPath("c", "crm", "pipedrive"), 404},
		{"PUT", connPath("c", "crm", "pipedrive"), 409},
		{"PUT", connPath("c", "crm", "pipedrive"), 413},
		{"PUT", connPath("c", "crm", "pipedrive"), 415},
		{"PUT", connPath("c", "crm", "salesforce"), 422},
		{"PATCH", connPath("c", "crm", "pipedrive"), 400},
		{"PATCH", connPath("c", "crm", "pipedrive"), 404},
		{"PATCH", connPath("c", "crm", "pipedrive"), 409},
		{"PATCH", connPath("c", "crm", "pipedrive"), 413},
		{"PATCH", connPath("c", "crm", "pipedrive"), 415},
		{"PATCH", connPath("c", "crm", "pipedrive"), 422},
		{"DELETE", connPath("c", "crm", "pipedrive"), 400},
		{"DELETE", connPath("c", "crm", "pipedrive"), 404},
		{"DELETE", connPath("c", "crm", "pipedrive"), 409},
		{"GET", connPath("c", "crm", "pipedrive"), 400},
		{"GET", connPath("c", "crm", "pipedrive"), 404},
		{"POST", connPath("c", "crm", "pipedrive") + "/validate", 404},
		{"POST", connPath("c", "crm", "pipedrive") + "/validate", 409},
		{"POST", connPath("c", "crm", "pipedrive") + "/validate", 422},
		{"POST", connPath("c", "crm", "pipedrive") + "/validate", 503},
		{"POST", connPath("c", "crm", "pipedrive") + "/refresh", 422},
		{"POST", connPath("c", "crm", "pipedrive") + "/refresh", 409},
		{"PUT", connPath("c", "crm", "pipedrive"), 503},
		{"PATCH", connPath("c", "crm", "pipedrive"), 503},
		{"DELETE", connPath("c", "crm", "pipedrive"), 503},
		{"GET", connPath("c", "crm", "pipedrive"), 503},
		{"POST", connPath("c", "crm", "pipedrive") + "/refresh", 503},
		{"GET", "/v1/connections", 503},
		{"GET", "/v1/consumers/c/connections", 503},
		{"GET", "/v1/connections?limit=0", 400},
		{"GET", "/v1/consumers/c/connections", 400},
	}
	for _, c := range cases {
		p := doc.patternOf(c.path)
		require.NotEmpty(t, p, c.path)
		require.Contains(t, doc.statuses(c.method, p), c.status, "%s %s", c.method, p)
	}
}
