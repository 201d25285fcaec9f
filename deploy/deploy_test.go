package deploy

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gopkg.in/yaml.v3"
)

// Paths, relative to this package's directory (go test runs tests there).
const (
	metricsFile      = "metrics.txt"
	prometheusConfig = "prometheus/prometheus.yml"
	alertsFile       = "prometheus/alerts.yml"
	alertsTestFile   = "prometheus/alerts_test.yml"
	dashboardFile    = "grafana/dashboards/vaultfleet.json"
	datasourceFile   = "grafana/provisioning/datasources/prometheus.yml"
	dashProviderFile = "grafana/provisioning/dashboards/vaultfleet.yml"
	repoRoot         = ".."
	composeFile      = "../docker-compose.yml"
	dockerfile       = "../Dockerfile"
)

// envSkipTools, set to 1, skips the checks that need promtool or
// docker-compose when they are not installed. Without it a missing tool
// fails the test.
const envSkipTools = "VAULTFLEET_SKIP_TOOLS"

// Jobs of prometheus.yml by the vaultfleet command they scrape.
var jobOfCommand = map[string]string{
	"worker":    "vaultfleet-worker",
	"scheduler": "vaultfleet-scheduler",
	"serve":     "vaultfleet-serve",
	"dev":       "vaultfleet-dev",
}

// tool returns the path of a command-line tool the test needs. A missing
// tool fails the test (CI must run these checks) unless envSkipTools=1.
func tool(t *testing.T, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	if os.Getenv(envSkipTools) == "1" {
		t.Skipf("%s is not installed and %s=1: skipping", name, envSkipTools)
	}
	t.Fatalf("%s is not installed: .ci/run installs it (Debian package %s); "+
		"set %s=1 to skip the checks that need it", name, debianPackage, envSkipTools)
	return ""
}

// runTool runs a tool in dir with a deadline and returns its combined
// output. env nil means the test's environment.
func runTool(t *testing.T, dir string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, yaml.Unmarshal(b, v), "parse %s", path)
}

// ---- deploy/metrics.txt ----

// family is one line of metrics.txt.
type family struct {
	name, typ, exporter string
}

var (
	metricNameRE   = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	metricTypes    = []string{"counter", "gauge", "histogram", "summary"}
	metricExporter = []string{"worker", "scheduler", "serve", "all", "prometheus"}
)

// loadMetrics reads metrics.txt: "name type exporter" per line, '#'
// comments.
func loadMetrics(t *testing.T) map[string]family {
	t.Helper()
	b, err := os.ReadFile(metricsFile)
	require.NoError(t, err)
	fams := map[string]family{}
	for i, line := range strings.Split(string(b), "\n") {
		if j := strings.IndexByte(line, '#'); j >= 0 {
			line = line[:j]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		where := fmt.Sprintf("%s:%d", metricsFile, i+1)
		require.Len(t, f, 3, "%s: want \"name type exporter\"", where)
		require.Regexp(t, metricNameRE, f[0], where)
		require.Contains(t, metricTypes, f[1], "%s: type", where)
		require.Contains(t, metricExporter, f[2], "%s: exporter", where)
		require.NotContains(t, fams, f[0], "%s: listed twice", where)
		fams[f[0]] = family{name: f[0], typ: f[1], exporter: f[2]}
	}
	require.NotEmpty(t, fams)
	return fams
}

func TestMetricsFixture(t *testing.T) {
	t.Parallel()
	fams := loadMetrics(t)
	for _, f := range fams {
		if !strings.HasPrefix(f.name, "vaultfleet_") {
			continue // asynq's and client_golang's names are theirs
		}
		switch f.typ {
		case "counter":
			require.True(t, strings.HasSuffix(f.name, "_total"), "counter %s should end in _total", f.name)
		default:
			require.False(t, strings.HasSuffix(f.name, "_total"), "%s %s must not end in _total", f.typ, f.name)
		}
	}
	for _, name := range []string{"up", "vaultfleet_checks_total", "vaultfleet_connections",
		"vaultfleet_scheduler_lag_seconds", "asynq_queue_latency_seconds"} {
		require.Contains(t, fams, name)
	}
}

var (
	// promStringRE matches PromQL string literals, which hold label
	// values, not metric names.
	promStringRE = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	// metricRefRE matches the identifiers that look like metric names of
	// the fleet.
	metricRefRE = regexp.MustCompile(`\b(?:(?:vaultfleet|asynq|go|process)_[A-Za-z0-9_:]*|up)\b`)
)

// metricNames returns the metric names a PromQL expression names.
func metricNames(expr string) []string {
	names := metricRefRE.FindAllString(promStringRE.ReplaceAllString(expr, `""`), -1)
	sort.Strings(names)
	return slices.Compact(names)
}

// checkMetricName reports why name is not a series the fleet exports, or
// "" if it is: a listed family, or the _bucket/_sum/_count series of a
// listed histogram (or _sum/_count of a summary). A histogram's bare name
// has no series.
func checkMetricName(fams map[string]family, name string) string {
	if f, ok := fams[name]; ok {
		if f.typ == "histogram" {
			return fmt.Sprintf("%s is a histogram: use %[1]s_bucket, %[1]s_sum or %[1]s_count", name)
		}
		return ""
	}
	for _, s := range []struct {
		suffix string
		types  []string
	}{
		{"_bucket", []string{"histogram"}},
		{"_sum", []string{"histogram", "summary"}},
		{"_count", []string{"histogram", "summary"}},
	} {
		if base, ok := strings.CutSuffix(name, s.suffix); ok {
			if f, ok := fams[base]; ok && slices.Contains(s.types, f.typ) {
				return ""
			}
		}
	}
	return fmt.Sprintf("%s is not in deploy/%s (the metrics the fleet exports)", name, metricsFile)
}

// requireKnownMetrics fails unless expr names at least one metric and only
// metrics the fleet exports.
func requireKnownMetrics(t *testing.T, fams map[string]family, where, expr string) {
	t.Helper()
	names := metricNames(expr)
	require.NotEmpty(t, names, "%s: names no fleet metric: %s", where, expr)
	for _, n := range names {
		if why := checkMetricName(fams, n); why != "" {
			t.Errorf("%s: %s\n\texpr: %s", where, why, expr)
		}
	}
}

var jobMatcherRE = regexp.MustCompile(`\bjob\s*=\s*"([^"]*)"`)

// requireKnownJobs fails if expr selects a job="..." prometheus.yml does
// not scrape.
func requireKnownJobs(t *testing.T, jobs map[string][]string, where, expr string) {
	t.Helper()
	for _, m := range jobMatcherRE.FindAllStringSubmatch(expr, -1) {
		require.Contains(t, jobs, m[1], "%s: job %q is not scraped by %s", where, m[1], prometheusConfig)
	}
}

func TestMetricNames(t *testing.T) {
	t.Parallel()
	fams := map[string]family{
		"vaultfleet_checks_total":           {"vaultfleet_checks_total", "counter", "worker"},
		"vaultfleet_check_duration_seconds": {"vaultfleet_check_duration_seconds", "histogram", "worker"},
		"go_gc_duration_seconds":            {"go_gc_duration_seconds", "summary", "all"},
		"up":                                {"up", "gauge", "prometheus"},
	}
	for expr, want := range map[string][]string{
		`sum by (integration) (rate(vaultfleet_checks_total{outcome="invalid"}[5m]))`:                             {"vaultfleet_checks_total"},
		`histogram_quantile(0.9, sum by (le) (rate(vaultfleet_check_duration_seconds_bucket[$__rate_interval])))`: {"vaultfleet_check_duration_seconds_bucket"},
		`sum(up{job="vaultfleet-worker"}) == 0 or absent(up{job="vaultfleet-worker"})`:                            {"up"},
		`vaultfleet_checks_total{integration="vaultfleet_fake_total", outcome='up'}`:                              {"vaultfleet_checks_total"},
		`group_left backup vaultfleet_checks_total`:                                                               {"vaultfleet_checks_total"},
	} {
		require.Equal(t, want, metricNames(expr), expr)
	}
	require.Empty(t, checkMetricName(fams, "vaultfleet_check_duration_seconds_bucket"))
	require.Empty(t, checkMetricName(fams, "vaultfleet_check_duration_seconds_count"))
	require.Empty(t, checkMetricName(fams, "go_gc_duration_seconds"))
	require.Empty(t, checkMetricName(fams, "go_gc_duration_seconds_sum"))
	require.NotEmpty(t, checkMetricName(fams, "vaultfleet_check_duration_seconds"))
	require.NotEmpty(t, checkMetricName(fams, "vaultfleet_checks_total_bucket"))
	require.NotEmpty(t, checkMetricName(fams, "go_gc_duration_seconds_bucket"))
	require.NotEmpty(t, checkMetricName(fams, "vaultfleet_nope_total"))
}

// ---- deploy/prometheus ----

type promConfig struct {
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName       string `yaml:"job_name"`
		StaticConfigs []struct {
			Targets []string `yaml:"targets"`
		} `yaml:"static_configs"`
		DNSSDConfigs []struct {
			Names []string `yaml:"names"`
			Port  int      `yaml:"port"`
		} `yaml:"dns_sd_configs"`
	} `yaml:"scrape_configs"`
}

// scrapeJobs returns the targets of prometheus.yml by job name; a DNS
// discovered name is listed as "name:port".
func scrapeJobs(t *testing.T) map[string][]string {
	t.Helper()
	var cfg promConfig
	readYAML(t, prometheusConfig, &cfg)
	require.Contains(t, cfg.RuleFiles, "alerts.yml")
	jobs := map[string][]string{}
	for _, sc := range cfg.ScrapeConfigs {
		require.NotContains(t, jobs, sc.JobName, "job listed twice")
		jobs[sc.JobName] = []string{}
		for _, s := range sc.StaticConfigs {
			jobs[sc.JobName] = append(jobs[sc.JobName], s.Targets...)
		}
		for _, d := range sc.DNSSDConfigs {
			for _, n := range d.Names {
				jobs[sc.JobName] = append(jobs[sc.JobName], n+":"+strconv.Itoa(d.Port))
			}
		}
	}
	for _, job := range []string{"vaultfleet-worker", "vaultfleet-scheduler", "vaultfleet-serve"} {
		require.NotEmpty(t, jobs[job], "%s scrapes no %s target", prometheusConfig, job)
	}
	return jobs
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

type ruleTestFile struct {
	RuleFiles []string `yaml:"rule_files"`
	Tests     []struct {
		AlertRuleTest []struct {
			EvalTime  string `yaml:"eval_time"`
			Alertname string `yaml:"alertname"`
			ExpAlerts []struct {
				ExpLabels      map[string]string `yaml:"exp_labels"`
				ExpAnnotations map[string]string `yaml:"exp_annotations"`
			} `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

func TestPrometheusTools(t *testing.T) {
	t.Parallel()
	promtool := tool(t, "promtool", "prometheus")

	t.Run("CheckConfig", func(t *testing.T) {
		t.Parallel()
		out, err := runTool(t, ".", nil, promtool, "check", "config", prometheusConfig)
		require.NoError(t, err, "promtool check config %s:\n%s", prometheusConfig, out)
	})
	t.Run("CheckRules", func(t *testing.T) {
		t.Parallel()
		out, err := runTool(t, ".", nil, promtool, "check", "rules", "--lint-fatal", alertsFile)
		require.NoError(t, err, "promtool check rules %s:\n%s", alertsFile, out)
	})
	t.Run("TestRules", func(t *testing.T) {
		t.Parallel()
		out, err := runTool(t, ".", nil, promtool, "test", "rules", alertsTestFile)
		require.NoError(t, err, "promtool test rules %s:\n%s", alertsTestFile, out)
		require.Contains(t, out, "SUCCESS")
	})
}

func TestAlertRules(t *testing.T) {
	t.Parallel()
	fams := loadMetrics(t)
	jobs := scrapeJobs(t)
	var rules ruleFile
	readYAML(t, alertsFile, &rules)
	alerts := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			where := fmt.Sprintf("%s: alert %s", alertsFile, r.Alert)
			alerts[r.Alert] = true
			require.Contains(t, []string{"critical", "warning"}, r.Labels["severity"], "%s: severity label", where)
			require.NotEmpty(t, r.Annotations["summary"], "%s: summary annotation", where)
			require.NotEmpty(t, r.Annotations["description"], "%s: description annotation", where)
			require.NotEmpty(t, r.For, "%s: a for: duration rides out one bad scrape", where)
			for _, id := range []string{"connection", "consumer"} {
				require.NotContains(t, r.Expr, id, "%s: no connection or consumer id in alerts", where)
			}
			requireKnownMetrics(t, fams, where, r.Expr)
			requireKnownJobs(t, jobs, where, r.Expr)
		}
	}
	for _, name := range []string{"InvalidationWave", "ProviderOutage", "SchedulerLag",
		"TokenRefreshFailures", "QueueBacklog", "NoWorkerUp"} {
		require.True(t, alerts[name], "%s has no alert %s", alertsFile, name)
	}

	// Every alert has a promtool unit test case where it fires and one
	// where it stays quiet; every case names an alert that exists (a quiet
	// case for a misspelt name would pass vacuously).
	var tests ruleTestFile
	readYAML(t, alertsTestFile, &tests)
	require.Equal(t, []string{filepath.Base(alertsFile)}, tests.RuleFiles)
	firing, quiet := map[string]int{}, map[string]int{}
	for _, tg := range tests.Tests {
		for _, c := range tg.AlertRuleTest {
			require.True(t, alerts[c.Alertname], "%s: test case at %s names unknown alert %q", alertsTestFile, c.EvalTime, c.Alertname)
			if len(c.ExpAlerts) > 0 {
				firing[c.Alertname]++
			} else {
				quiet[c.Alertname]++
			}
		}
	}
	for name := range alerts {
		require.Positive(t, firing[name], "%s: no test case where %s fires", alertsTestFile, name)
		require.Positive(t, quiet[name], "%s: no test case where %s stays quiet (exp_alerts: [])", alertsTestFile, name)
	}
}

// ---- deploy/grafana ----

type dashboardJSON struct {
	UID           string          `json:"uid"`
	Title         string          `json:"title"`
	SchemaVersion int             `json:"schemaVersion"`
	Panels        []dashPanel     `json:"panels"`
	Time          json.RawMessage `json:"time"`
	Links         []struct {
		Title string `json:"title"`
		Type  string `json:"type"`
		URL   string `json:"url"`
	} `json:"links"`
	Annotations struct {
		List []struct {
			Name       string          `json:"name"`
			Enable     bool            `json:"enable"`
			Datasource json.RawMessage `json:"datasource"`
			Expr       string          `json:"expr"`
		} `json:"list"`
	} `json:"annotations"`
	Templating struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Definition string          `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

type dashPanel struct {
	ID      *int   `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos *struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Datasource json.RawMessage `json:"datasource"`
	Targets    []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
	Panels    []dashPanel `json:"panels"` // a collapsed row's panels
	Collapsed bool        `json:"collapsed"`
}

// grafanaVarRE matches $name, ${name}, ${name:format} and [[name]].
var grafanaVarRE = regexp.MustCompile(`\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]`)

// grafanaBuiltins are Grafana's own variables, with values that make the
// PromQL parse as it will in Grafana.
var grafanaBuiltins = map[string]string{
	"__rate_interval": "1m",
	"__interval":      "30s",
	"__interval_ms":   "30000",
	"__range":         "1h",
	"__range_s":       "3600",
	"__range_ms":      "3600000",
}

// expandGrafanaVars replaces Grafana's variables: built-ins by a duration,
// the dashboard's variables (used in label matchers) by ".*". It returns
// the names it does not know.
func expandGrafanaVars(expr string, dashVars map[string]bool) (string, []string) {
	var unknown []string
	out := grafanaVarRE.ReplaceAllStringFunc(expr, func(m string) string {
		sm := grafanaVarRE.FindStringSubmatch(m)
		name := sm[1] + sm[2] + sm[3]
		if v, ok := grafanaBuiltins[name]; ok {
			return v
		}
		if dashVars[name] {
			return ".*"
		}
		unknown = append(unknown, name)
		return m
	})
	return out, unknown
}

func TestExpandGrafanaVars(t *testing.T) {
	t.Parallel()
	vars := map[string]bool{"integration": true}
	got, unknown := expandGrafanaVars(`rate(x{integration=~"$integration", a=~"${integration:regex}", b=~"[[integration]]"}[$__rate_interval])`, vars)
	require.Equal(t, `rate(x{integration=~".*", a=~".*", b=~".*"}[1m])`, got)
	require.Empty(t, unknown)
	_, unknown = expandGrafanaVars(`x{a="$nope"}`, vars)
	require.Equal(t, []string{"nope"}, unknown)
}

// loadDashboard parses the dashboard and checks its structure.
func loadDashboard(t *testing.T) (*dashboardJSON, []dashPanel, map[string]bool) {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	require.NoError(t, err)
	var raw map[string]any
	require.NoError(t, json.Unmarshal(b, &raw), "%s is not JSON", dashboardFile)
	for _, k := range []string{"uid", "title", "schemaVersion", "panels", "time", "templating"} {
		require.Contains(t, raw, k, "%s: dashboard key", dashboardFile)
	}
	var d dashboardJSON
	require.NoError(t, json.Unmarshal(b, &d))
	require.NotEmpty(t, d.UID)
	require.NotEmpty(t, d.Title)
	require.Positive(t, d.SchemaVersion)

	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		require.NotEmpty(t, v.Name)
		require.NotEmpty(t, v.Type, "variable %s: type", v.Name)
		vars[v.Name] = true
	}

	var panels []dashPanel
	var walk func([]dashPanel)
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			panels = append(panels, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	require.NotEmpty(t, panels)
	return &d, panels, vars
}

func TestDashboard(t *testing.T) {
	t.Parallel()
	fams := loadMetrics(t)
	jobs := scrapeJobs(t)
	d, panels, vars := loadDashboard(t)

	type rect struct {
		title      string
		x, y, w, h int
	}
	var rects []rect
	ids := map[int]string{}
	for i, p := range panels {
		where := fmt.Sprintf("%s: panel %d %q", dashboardFile, i, p.Title)
		if p.Type == "row" {
			require.NotNil(t, p.ID, "%s: id", where)
			require.NotContains(t, ids, *p.ID, "%s: id %d also used by %q", where, *p.ID, ids[*p.ID])
			ids[*p.ID] = p.Title
			require.NotNil(t, p.GridPos, "%s: gridPos", where)
			require.Equal(t, 24, p.GridPos.W, "%s: a row spans the width", where)
			require.Empty(t, p.Targets, "%s: a row has no queries", where)
			rects = append(rects, rect{p.Title, p.GridPos.X, p.GridPos.Y, p.GridPos.W, p.GridPos.H})
			continue
		}
		require.NotNil(t, p.ID, "%s: id", where)
		require.Positive(t, *p.ID, "%s: id", where)
		require.NotContains(t, ids, *p.ID, "%s: id %d also used by %q", where, *p.ID, ids[*p.ID])
		ids[*p.ID] = p.Title
		require.NotEmpty(t, p.Type, "%s: type", where)
		require.NotEmpty(t, p.Title, "%s: title", where)
		require.NotNil(t, p.GridPos, "%s: gridPos", where)
		g := p.GridPos
		require.True(t, g.W > 0 && g.H > 0 && g.X >= 0 && g.Y >= 0 && g.X+g.W <= 24, "%s: gridPos %+v", where, *g)
		rects = append(rects, rect{p.Title, g.X, g.Y, g.W, g.H})
		require.NotEmpty(t, p.Datasource, "%s: datasource", where)
		require.NotEqual(t, "null", string(p.Datasource), "%s: datasource", where)
		require.NotEmpty(t, p.Targets, "%s: targets", where)
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			require.NotEmpty(t, tg.RefID, "%s: target refId", where)
			require.False(t, refs[tg.RefID], "%s: refId %s twice", where, tg.RefID)
			refs[tg.RefID] = true
			require.NotEmpty(t, strings.TrimSpace(tg.Expr), "%s: target %s expr", where, tg.RefID)
			requireKnownMetrics(t, fams, where, tg.Expr)
			requireKnownJobs(t, jobs, where, tg.Expr)
			_, unknown := expandGrafanaVars(tg.Expr, vars)
			require.Empty(t, unknown, "%s: undefined variables", where)
		}
	}
	for i, a := range rects {
		for _, b := range rects[i+1:] {
			overlap := a.x < b.x+b.w && b.x < a.x+a.w && a.y < b.y+b.h && b.y < a.y+a.h
			require.False(t, overlap, "%s: panels %q and %q overlap", dashboardFile, a.title, b.title)
		}
	}

	requireDashboardRows(t, d)
	requireDashboardNavigation(t, d, vars, panelExprs(panels))

	// Query variables list label values of metrics the fleet exports.
	labelValuesRE := regexp.MustCompile(`label_values\(\s*([^,]+?)\s*,`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := v.Definition
		var qs string
		var qo struct {
			Query string `json:"query"`
		}
		switch {
		case json.Unmarshal(v.Query, &qs) == nil:
			q += " " + qs
		case json.Unmarshal(v.Query, &qo) == nil:
			q += " " + qo.Query
		}
		for _, m := range labelValuesRE.FindAllStringSubmatch(q, -1) {
			requireKnownMetrics(t, fams, "variable "+v.Name, m[1])
		}
	}

	// The panels the issue asks for.
	all := ""
	for _, p := range panels {
		for _, tg := range p.Targets {
			all += tg.Expr + "\n"
		}
	}
	for _, want := range []string{"vaultfleet_connections", "vaultfleet_checks_total",
		"vaultfleet_check_duration_seconds_bucket", "vaultfleet_state_transitions_total",
		"vaultfleet_token_refreshes_total", "asynq_queue_size", "asynq_queue_latency_seconds",
		"vaultfleet_scheduler_lag_seconds", "vaultfleet_webhook_deliveries_total"} {
		require.Contains(t, all, want, "%s: no panel shows %s", dashboardFile, want)
	}
	require.Contains(t, all, "histogram_quantile(", "%s: no latency quantiles", dashboardFile)
}

// panelExprs joins the PromQL of every panel.
func panelExprs(panels []dashPanel) string {
	var b strings.Builder
	for _, p := range panels {
		for _, tg := range p.Targets {
			b.WriteString(tg.Expr + "\n")
		}
	}
	return b.String()
}

// dashboardRows are the dashboard's rows, in order.
var dashboardRows = []string{"Fleet", "Checks", "Refreshes", "Queues", "Scheduler", "Webhooks"}

// requireDashboardRows: every panel sits in one of the rows, and every row
// holds panels (a collapsed row inside it, an open one up to the next row).
func requireDashboardRows(t *testing.T, d *dashboardJSON) {
	t.Helper()
	require.NotEmpty(t, d.Panels)
	require.Equal(t, "row", d.Panels[0].Type, "%s: the first panel is a row, so every panel belongs to one", dashboardFile)
	var titles []string
	count := map[string]int{}
	var current string
	for _, p := range d.Panels {
		if p.Type == "row" {
			current = p.Title
			titles = append(titles, p.Title)
			if p.Collapsed {
				require.NotEmpty(t, p.Panels, "%s: collapsed row %q holds no panels", dashboardFile, p.Title)
				count[current] += len(p.Panels)
			} else {
				require.Empty(t, p.Panels, "%s: open row %q: its panels follow it", dashboardFile, p.Title)
			}
			for _, in := range p.Panels {
				require.NotEqual(t, "row", in.Type, "%s: row in row %q", dashboardFile, p.Title)
			}
			continue
		}
		require.Empty(t, p.Panels, "%s: panel %q nests panels", dashboardFile, p.Title)
		count[current]++
	}
	require.Equal(t, dashboardRows, titles, "%s: rows", dashboardFile)
	for _, r := range dashboardRows {
		require.Positive(t, count[r], "%s: row %q has no panels", dashboardFile, r)
	}
}

// requireDashboardNavigation: the instance and queue variables filter
// panels, the links reach the monitor and the status page, and firing
// alerts of alerts.yml show as annotations.
func requireDashboardNavigation(t *testing.T, d *dashboardJSON, vars map[string]bool, exprs string) {
	t.Helper()
	for _, v := range []string{"instance", "queue", "vaultfleet_url"} {
		require.True(t, vars[v], "%s: no %s variable", dashboardFile, v)
	}
	require.Contains(t, exprs, `instance=~"$instance"`, "%s: no panel filters by instance", dashboardFile)
	require.Contains(t, exprs, `queue=~"$queue"`, "%s: no panel filters by queue", dashboardFile)
	var urls []string
	for _, l := range d.Links {
		urls = append(urls, l.URL)
	}
	require.Contains(t, urls, "${vaultfleet_url}/monitor/", "%s: link to the monitor", dashboardFile)
	require.Contains(t, urls, "${vaultfleet_url}/", "%s: link to the status page", dashboardFile)

	var cfg struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	readYAML(t, alertsFile, &cfg)
	var alerts []string
	for _, g := range cfg.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				alerts = append(alerts, r.Alert)
			}
		}
	}
	require.NotEmpty(t, alerts)
	found := false
	nameRE := regexp.MustCompile(`alertname=~"([^"]*)"`)
	for _, a := range d.Annotations.List {
		if !strings.Contains(a.Expr, "ALERTS{") || !strings.Contains(a.Expr, `alertstate="firing"`) {
			continue
		}
		found = true
		require.True(t, a.Enable, "%s: annotation %q is off", dashboardFile, a.Name)
		require.NotEmpty(t, a.Datasource, "%s: annotation %q: datasource", dashboardFile, a.Name)
		m := nameRE.FindStringSubmatch(a.Expr)
		if m == nil {
			continue // every alert
		}
		re := regexp.MustCompile("^(?:" + m[1] + ")$")
		for _, name := range alerts {
			require.True(t, re.MatchString(name), "%s: annotation %q leaves out alert %s", dashboardFile, a.Name, name)
		}
	}
	require.True(t, found, "%s: no annotation from firing alerts (ALERTS{alertstate=\"firing\"})", dashboardFile)
}

// TestDashboardPromQL parses every panel's PromQL with promtool: one
// recording rule per expression, Grafana variables replaced by concrete
// values first.
func TestDashboardPromQL(t *testing.T) {
	t.Parallel()
	promtool := tool(t, "promtool", "prometheus")
	_, panels, vars := loadDashboard(t)

	type rule struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var rules []rule
	var listing strings.Builder
	refRE := regexp.MustCompile(`[^A-Za-z0-9_]`)
	for _, p := range panels {
		for _, tg := range p.Targets {
			expr, unknown := expandGrafanaVars(tg.Expr, vars)
			require.Empty(t, unknown, "panel %q: undefined variables", p.Title)
			name := fmt.Sprintf("dashboard:panel_%d_%s", *p.ID, refRE.ReplaceAllString(tg.RefID, "_"))
			rules = append(rules, rule{Record: name, Expr: expr})
			fmt.Fprintf(&listing, "%s (%q): %s\n", name, p.Title, expr)
		}
	}
	// The variables' label_values selectors and the annotations' queries.
	d, _, _ := loadDashboard(t)
	selectorRE := regexp.MustCompile(`^label_values\(\s*(.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := selectorRE.FindStringSubmatch(strings.TrimSpace(v.Definition))
		require.NotNil(t, m, "variable %s: want label_values(selector, label), got %q", v.Name, v.Definition)
		expr, unknown := expandGrafanaVars(m[1], vars)
		require.Empty(t, unknown, "variable %s: undefined variables", v.Name)
		rules = append(rules, rule{Record: "dashboard:variable_" + v.Name, Expr: expr})
		fmt.Fprintf(&listing, "variable %s: %s\n", v.Name, expr)
	}
	for i, a := range d.Annotations.List {
		if a.Expr == "" {
			continue
		}
		expr, unknown := expandGrafanaVars(a.Expr, vars)
		require.Empty(t, unknown, "annotation %q: undefined variables", a.Name)
		rules = append(rules, rule{Record: fmt.Sprintf("dashboard:annotation_%d", i), Expr: expr})
		fmt.Fprintf(&listing, "annotation %q: %s\n", a.Name, expr)
	}
	file := map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}}
	b, err := yaml.Marshal(file)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "dashboard_rules.yml")
	require.NoError(t, os.WriteFile(path, b, 0o600))
	out, err := runTool(t, ".", nil, promtool, "check", "rules", "--lint=none", path)
	require.NoError(t, err, "promtool check rules on the dashboard's PromQL:\n%s\nexpressions:\n%s", out, listing.String())
	require.Contains(t, out, fmt.Sprintf("SUCCESS: %d rules found", len(rules)))
}

func TestGrafanaProvisioning(t *testing.T) {
	t.Parallel()
	var ds struct {
		APIVersion  int `yaml:"apiVersion"`
		Datasources []struct {
			Name, Type, URL, UID string
		} `yaml:"datasources"`
	}
	readYAML(t, datasourceFile, &ds)
	require.Equal(t, 1, ds.APIVersion)
	require.Len(t, ds.Datasources, 1)
	require.Equal(t, "prometheus", ds.Datasources[0].Type)
	require.Equal(t, "http://prometheus:9090", ds.Datasources[0].URL, "the compose service prometheus")

	var prov struct {
		APIVersion int `yaml:"apiVersion"`
		Providers  []struct {
			Name    string `yaml:"name"`
			Type    string `yaml:"type"`
			Options struct {
				Path string `yaml:"path"`
			} `yaml:"options"`
		} `yaml:"providers"`
	}
	readYAML(t, dashProviderFile, &prov)
	require.Equal(t, 1, prov.APIVersion)
	require.Len(t, prov.Providers, 1)
	require.Equal(t, "file", prov.Providers[0].Type)

	// docker-compose.yml mounts the dashboards where the provider looks,
	// and the provisioning directory where Grafana reads it.
	c := loadCompose(t)
	g, ok := c.Services["grafana"]
	require.True(t, ok, "docker-compose.yml has no grafana service")
	require.Contains(t, g.Volumes, "./deploy/grafana/dashboards:"+prov.Providers[0].Options.Path+":ro")
	require.Contains(t, g.Volumes, "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro")
}

// ---- docker-compose.yml and Dockerfile ----

type composeService struct {
	Image       string            `yaml:"image"`
	Build       any               `yaml:"build"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	Profiles    []string          `yaml:"profiles"`
	DependsOn   map[string]struct {
		Condition string `yaml:"condition"`
	} `yaml:"depends_on"`
	Deploy struct {
		Replicas *int `yaml:"replicas"`
	} `yaml:"deploy"`
	Healthcheck struct {
		Test []string `yaml:"test"`
	} `yaml:"healthcheck"`
	Volumes []string `yaml:"volumes"`
	Ports   []string `yaml:"ports"`
}

type composeProject struct {
	Services map[string]composeService `yaml:"services"`
	Volumes  map[string]any            `yaml:"volumes"`
}

// loadCompose parses docker-compose.yml as written (anchors and merge keys
// resolved by yaml.v3). Commands and environments are written as a list
// and a map so that they parse into these fields.
func loadCompose(t *testing.T) *composeProject {
	t.Helper()
	var c composeProject
	readYAML(t, composeFile, &c)
	require.NotEmpty(t, c.Services)
	return &c
}

// composeEnvAllowed lists the variables docker-compose.yml may set on a
// vaultfleet service (the binary reads them; cmd/vaultfleet's compose test
// checks that against the binary itself).
var composeEnvAllowed = []string{
	"REDIS_URL", "VAULTFLEET_ENCRYPTION_KEYS", "VAULTFLEET_CATALOG", "VAULTFLEET_ADDR",
	"VAULTFLEET_LOG_FORMAT", "VAULTFLEET_LOG_LEVEL", "VAULTFLEET_SHARDS", "VAULTFLEET_CONCURRENCY",
	"VAULTFLEET_SHUTDOWN_TIMEOUT", "VAULTFLEET_API_TOKENS", "VAULTFLEET_WEBHOOKS",
	"VAULTFLEET_PROMETHEUS_URL", "VAULTFLEET_MONITOR_READONLY",
}

// secretEnv must come from ${VAR:?message} interpolation, never a literal.
var secretEnv = []string{"VAULTFLEET_ENCRYPTION_KEYS", "VAULTFLEET_API_TOKENS"}

// isVaultfleet reports whether a compose service runs the image built from
// this repository.
func isVaultfleet(s composeService) bool {
	return s.Build != nil
}

func TestComposeFile(t *testing.T) {
	t.Parallel()
	c := loadCompose(t)
	jobs := scrapeJobs(t)

	replicas := map[string]int{}
	for name, s := range c.Services {
		if !isVaultfleet(s) {
			continue
		}
		where := "docker-compose.yml: service " + name
		require.Len(t, s.Command, 1, "%s: command is one plain subcommand, e.g. [\"worker\"]", where)
		cmd := s.Command[0]
		require.Contains(t, jobOfCommand, cmd, "%s: command", where)
		n := 1
		if s.Deploy.Replicas != nil {
			n = *s.Deploy.Replicas
		}
		if len(s.Profiles) == 0 {
			replicas[cmd] += n
		}
		for k, v := range s.Environment {
			require.Contains(t, composeEnvAllowed, k, "%s: environment variable the binary does not read", where)
			if slices.Contains(secretEnv, k) {
				require.Regexp(t, `^\$\{`+k+`:\?[^}]+\}$`, v, "%s: %s must come from ${%s:?message}", where, k, k)
			}
		}
		if cmd == "dev" {
			require.Equal(t, []string{"sim"}, s.Profiles, "%s: dev runs only in the sim profile", where)
			require.NotContains(t, s.Environment, "REDIS_URL", "%s: the simulation keeps to its embedded Redis", where)
		} else {
			require.Empty(t, s.Profiles, "%s: the fleet runs without a profile", where)
			require.Equal(t, "service_healthy", s.DependsOn["redis"].Condition, "%s: waits for a healthy redis", where)
			require.Equal(t, "redis://redis:6379/0", s.Environment["REDIS_URL"], where)
			require.NotEmpty(t, s.Environment["VAULTFLEET_ENCRYPTION_KEYS"], where)
		}

		// Prometheus scrapes every process on the port it listens on.
		addr := s.Environment["VAULTFLEET_ADDR"]
		require.Regexp(t, `^:\d+$`, addr, "%s: VAULTFLEET_ADDR listens on all interfaces of the container", where)
		require.Contains(t, jobs[jobOfCommand[cmd]], name+addr, "%s: not scraped by job %s", where, jobOfCommand[cmd])
	}
	require.Equal(t, map[string]int{"worker": 3, "scheduler": 2, "serve": 1}, replicas)

	// Every target Prometheus scrapes is a compose service.
	for job, targets := range jobs {
		if !strings.HasPrefix(job, "vaultfleet-") {
			continue
		}
		for _, tg := range targets {
			host, _, _ := strings.Cut(tg, ":")
			require.Contains(t, c.Services, host, "job %s scrapes %s, which is no compose service", job, tg)
		}
	}

	redis, ok := c.Services["redis"]
	require.True(t, ok, "no redis service")
	require.True(t, strings.HasPrefix(redis.Image, "redis:7"), "redis image %q", redis.Image)
	i := slices.Index(redis.Command, "--appendonly")
	require.True(t, i >= 0 && i+1 < len(redis.Command) && redis.Command[i+1] == "yes", "redis runs with --appendonly yes: %v", redis.Command)
	require.Contains(t, strings.Join(redis.Healthcheck.Test, " "), "redis-cli ping")
	require.Contains(t, redis.Volumes, "redis-data:/data")
	require.Contains(t, c.Volumes, "redis-data")

	serve := c.Services["serve"]
	require.Equal(t, []string{"serve"}, serve.Command)
	require.Equal(t, "http://prometheus:9090", serve.Environment["VAULTFLEET_PROMETHEUS_URL"])

	prom, ok := c.Services["prometheus"]
	require.True(t, ok, "no prometheus service")
	require.Contains(t, prom.Volumes, "./deploy/prometheus:/etc/prometheus:ro")
}

// composeEnv is the environment for docker-compose: the test's own,
// without the variables docker-compose.yml interpolates, plus extra.
func composeEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if slices.Contains(secretEnv, k) || k == "GRAFANA_ADMIN_PASSWORD" || strings.HasPrefix(k, "VAULTFLEET_") || strings.HasPrefix(k, "COMPOSE_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

func TestComposeConfig(t *testing.T) {
	t.Parallel()
	dc := tool(t, "docker-compose", "docker-compose")
	// An empty env file, so that a developer's .env plays no part.
	envFile := filepath.Join(t.TempDir(), "empty.env")
	require.NoError(t, os.WriteFile(envFile, nil, 0o600))
	key := "test:" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	secrets := []string{
		"VAULTFLEET_ENCRYPTION_KEYS=" + key,
		"VAULTFLEET_API_TOKENS=compose-test-token-0123456789",
		"GRAFANA_ADMIN_PASSWORD=compose-test-password",
	}
	base := []string{"--env-file", envFile, "-f", "docker-compose.yml"}

	t.Run("Default", func(t *testing.T) {
		t.Parallel()
		out, err := runTool(t, repoRoot, composeEnv(secrets...), dc, append(base, "config", "-q")...)
		require.NoError(t, err, "docker-compose config:\n%s", out)
	})
	t.Run("SimProfile", func(t *testing.T) {
		t.Parallel()
		out, err := runTool(t, repoRoot, composeEnv(secrets...), dc, append(base, "--profile", "sim", "config", "-q")...)
		require.NoError(t, err, "docker-compose --profile sim config:\n%s", out)
	})
	// Each secret is required: without it docker-compose refuses, naming it.
	for i, s := range secrets {
		name, _, _ := strings.Cut(s, "=")
		others := slices.Delete(slices.Clone(secrets), i, i+1)
		t.Run("Requires"+name, func(t *testing.T) {
			t.Parallel()
			out, err := runTool(t, repoRoot, composeEnv(others...), dc, append(base, "config", "-q")...)
			require.Error(t, err, "docker-compose config succeeded without %s", name)
			require.Contains(t, out, name, "the error names the missing variable")
		})
	}
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(dockerfile)
	require.NoError(t, err)
	var from, user, expose []string
	var entrypoint string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			from = append(from, f[1])
		case "USER":
			user = append(user, f[1])
		case "EXPOSE":
			expose = append(expose, f[1:]...)
		case "ENTRYPOINT":
			entrypoint = strings.Join(f[1:], " ")
		}
	}
	require.Len(t, from, 2, "multi-stage: a builder and the final image")
	require.True(t, strings.HasPrefix(from[0], "golang:1.26"), "builder %s", from[0])
	require.True(t, strings.HasPrefix(from[1], "gcr.io/distroless/static") || from[1] == "scratch", "final stage %s", from[1])
	require.NotEmpty(t, user, "the final stage sets a USER")
	last := user[len(user)-1]
	require.NotContains(t, []string{"root", "0", "0:0", "root:root"}, last, "runs as non-root")
	require.Equal(t, `["/vaultfleet"]`, entrypoint)
	require.ElementsMatch(t, []string{"8080", "9101", "9102"}, expose)
	require.Contains(t, string(b), "CGO_ENABLED=0")
	require.Contains(t, string(b), "-trimpath")

	ignore, err := os.ReadFile(filepath.Join(repoRoot, ".dockerignore"))
	require.NoError(t, err)
	for _, p := range []string{".git", ".env"} {
		require.Contains(t, strings.Fields(string(ignore)), p, ".dockerignore keeps %s out of the build context", p)
	}
}
