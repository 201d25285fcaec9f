package main

import (
	"strconv"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/auth"
	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/events"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/internal/sim"
	"github.com/vaultfleet/vaultfleet/scheduler"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
	"github.com/vaultfleet/vaultfleet/worker"
)

// Environment variables the binary reads.
const (
	envRedisURL                = "REDIS_URL"
	envCatalog                 = "VAULTFLEET_CATALOG"
	envAddr                    = "VAULTFLEET_ADDR"
	envLogFormat               = "VAULTFLEET_LOG_FORMAT"
	envLogLevel                = "VAULTFLEET_LOG_LEVEL"
	envShards                  = "VAULTFLEET_SHARDS"
	envAckReps                 = "VAULTFLEET_ACK_REPLICAS"
	envWorkerConcurrency       = "VAULTFLEET_CONCURRENCY"
	envWorkerShutdownTimeout   = "VAULTFLEET_SHUTDOWN_TIMEOUT"
	envWorkerPersistTimeout    = "VAULTFLEET_PERSIST_TIMEOUT"
	envSchedTick               = "VAULTFLEET_TICK"
	envSchedBatch              = "VAULTFLEET_BATCH"
	envSchedLease              = "VAULTFLEET_LEASE"
	envSchedJitter             = "VAULTFLEET_JITTER"
	envSchedMaxLowPending      = "VAULTFLEET_MAX_LOW_PENDING"
	envSchedEnqueueConcurrency = "VAULTFLEET_ENQUEUE_CONCURRENCY"
	envSchedCheckBatch         = "VAULTFLEET_CHECK_BATCH"
	envAPITokens               = auth.EnvTokens
	envWebhooks                = events.EnvWebhooks
	envPrometheusURL           = "VAULTFLEET_PROMETHEUS_URL"
	envMonitorReadOnly         = "VAULTFLEET_MONITOR_READONLY"
	envSessionKeys             = session.EnvKeys
	envRedirectURIs            = connect.EnvRedirectURIs
	envPublicURL               = "VAULTFLEET_PUBLIC_URL"

	defaultRedisURL   = "redis://127.0.0.1:6379/0"
	defaultWorkerAddr = ":9101"
	defaultServeAddr  = ":8080"
	defaultDevAddr    = "127.0.0.1:8080"
)

// Command groups of the table.
var (
	fleetCmds   = []string{cmdDev, cmdWorker, cmdScheduler, cmdServe, cmdReseal}
	serverCmds  = []string{cmdDev, cmdWorker, cmdScheduler, cmdServe}
	storageCmds = []string{cmdWorker, cmdScheduler, cmdServe, cmdReseal}
)

// settings is every flag and environment variable of every command: the
// one place the binary's configuration is declared. Help, the README's
// table (TestREADMEConfigTable) and the compose check read it.
var settings = []setting{
	{env: envRedisURL, flag: "redis", kind: kindRedisURL, cmds: append([]string{cmdEnqueue}, fleetCmds...),
		def: defaultRedisURL, defs: map[string]string{cmdDev: ""}, defNote: "embedded Redis",
		help: "Redis URL: redis://[:pw@]host:port/db, rediss:// for TLS, redis-sentinel://[:sentinel-pw@]host:port[,host:port]/db?master=name[&password=master-pw], " +
			"redis-cluster://[:pw@]host:port[,host:port] (go-redis's own ?addr=host:port and ?master_name= forms work too; other query options are go-redis's)",
		helps: map[string]string{cmdDev: "use this Redis instead of the embedded one: dev writes its demo connections, tasks and dev key there"}},
	{env: secrets.EnvKeys, kind: kindSecret, cmds: fleetCmds,
		help:  "credential encryption keys id:base64(32 bytes)[,...]: the first encrypts, all decrypt (required)",
		helps: map[string]string{cmdDev: "credential encryption keys (default: a fresh key; with REDIS_URL, the dev key kept in that Redis)"}},
	{env: envCatalog, flag: "catalog", kind: kindString, cmds: append([]string{cmdEnqueue}, storageCmds...),
		defNote: "the built-in catalog",
		help:    "integration catalog YAML file",
		helps:   map[string]string{cmdEnqueue: "integration catalog YAML file: the connection id must name one of its integrations"}},
	{env: envAddr, flag: "addr", kind: kindAddr, cmds: serverCmds,
		defs: map[string]string{cmdWorker: defaultWorkerAddr, cmdScheduler: ":9102", cmdServe: defaultServeAddr, cmdDev: defaultDevAddr},
		help: "listen address of /metrics, /healthz and /readyz",
		helps: map[string]string{
			cmdServe: "listen address of the API, the monitor, the status page and /metrics, /healthz, /readyz",
			cmdDev:   "listen address of the API, the monitor, the status page and /metrics, /healthz, /readyz"}},
	{env: envLogFormat, flag: "log-format", kind: kindChoice, choices: []string{"json", "text"}, cmds: fleetCmds,
		def: "json", defs: map[string]string{cmdDev: "text"}, help: "log format"},
	{env: envLogLevel, flag: "log-level", kind: kindChoice, choices: []string{"debug", "info", "warn", "error"}, cmds: fleetCmds,
		def: "info", defs: map[string]string{cmdDev: "error", cmdReseal: "warn"},
		help: "log level", helps: map[string]string{cmdDev: "log level: warn shows retries, info every task"}},
	{env: envShards, flag: "shards", kind: kindInt, cmds: fleetCmds,
		def: strconv.Itoa(state.DefaultShards), min: "1", max: strconv.Itoa(state.MaxShards),
		help: "index shards: the same across the fleet (recorded in Redis at the first start; a process with another count refuses to start)"},
	{env: envAckReps, kind: kindInt, cmds: storageCmds, min: "0", max: "16", defNote: "1 with redis-sentinel://, else 0",
		help: "replicas that must acknowledge (Redis WAIT) a write of refreshed tokens before it counts as stored, and an exchange intent before the provider is called; an unacknowledged write is retried"},

	// worker (dev runs one too)
	{env: envWorkerConcurrency, flag: "concurrency", kind: kindInt, cmds: []string{cmdWorker, cmdDev},
		def: strconv.Itoa(worker.DefaultConcurrency), min: "1", help: "tasks processed at once"},
	{env: envWorkerShutdownTimeout, flag: "shutdown-timeout", kind: kindDuration, cmds: []string{cmdWorker},
		def: fmtDuration(worker.DefaultShutdownTimeout), positive: true,
		help: "how long in-flight tasks may finish after SIGTERM before they go back to the queue"},
	{env: envWorkerPersistTimeout, flag: "persist-timeout", kind: kindDuration, cmds: []string{cmdWorker},
		def: "90s", positive: true,
		help: "how long the tokens of a finished token exchange are retried into Redis (ride out a failover) before they are given up; " +
			"SIGTERM waits for exchanges in flight, so give the process shutdown timeout + token timeout (15s) + this before SIGKILL"},
	{env: envWebhooks, kind: kindString, cmds: []string{cmdWorker, cmdDev},
		help: "webhook subscriptions file: the worker relays state-change events to them and delivers them (optional)"},
	{env: "(the catalog's client_id_env, client_secret_env)", kind: kindSecret, cmds: []string{cmdWorker, cmdServe}, docOnly: true,
		help: "OAuth client credentials of each integration, named by the catalog (e.g. SALESFORCE_CLIENT_ID); serve: the connect flow's code exchange and revocation"},

	// scheduler
	{env: envSchedTick, flag: "tick", kind: kindDuration, cmds: []string{cmdScheduler},
		def: fmtDuration(scheduler.DefaultTick), positive: true, help: "pause between sweeps"},
	{env: envSchedBatch, flag: "batch", kind: kindInt, cmds: []string{cmdScheduler},
		def: strconv.Itoa(scheduler.DefaultBatch), min: "1", max: "100000",
		help: "members one claim takes from one shard; a shard is claimed again while batches come back full"},
	{env: envSchedLease, flag: "lease", kind: kindDuration, cmds: []string{cmdScheduler},
		def: fmtDuration(scheduler.DefaultLease), min: "1s",
		help: "how long a claim is held: work whose enqueue failed is due again after it"},
	{env: envSchedJitter, flag: "jitter", kind: kindFloat, cmds: []string{cmdScheduler},
		def: strconv.FormatFloat(scheduler.DefaultJitter, 'f', -1, 64), min: "0", max: "0.5",
		help: "spread of the next check time: ±jitter × the interval; 0 means none"},
	{env: envSchedMaxLowPending, flag: "max-low-pending", kind: kindInt, cmds: []string{cmdScheduler},
		def: strconv.Itoa(scheduler.DefaultMaxLowPending), min: "0",
		help: "pause periodic checks while the low queue holds this many pending tasks (a batch counts as one); 0 means no limit"},
	{env: envSchedEnqueueConcurrency, flag: "enqueue-concurrency", kind: kindInt, cmds: []string{cmdScheduler},
		def: strconv.Itoa(scheduler.DefaultEnqueueConcurrency), min: "1", max: "1024", help: "parallel enqueues"},
	{env: envSchedCheckBatch, flag: "check-batch", kind: kindInt, cmds: []string{cmdScheduler},
		def: strconv.Itoa(scheduler.DefaultCheckBatch), min: "1", max: strconv.Itoa(tasks.MaxBatch),
		help: "periodic checks of one integration per connection:validate_batch task; 1 means one connection:validate per check"},

	// serve (and dev)
	{env: envAPITokens, kind: kindSecret, cmds: []string{cmdServe, cmdDev},
		help:  "bearer tokens accepted by the API, comma-separated, at least 16 characters each (serve: required); browsers use one as the basic-auth password for / and /monitor",
		helps: map[string]string{cmdDev: "require these API tokens (default: none, and dev listens on loopback only)"}},
	{env: envPrometheusURL, flag: "prometheus-url", kind: kindURL, cmds: []string{cmdServe, cmdDev},
		help: "Prometheus base URL for the monitor's metrics charts (optional)"},
	{env: envMonitorReadOnly, flag: "monitor-readonly", kind: kindBool, cmds: []string{cmdServe}, def: "false",
		help: "the Asynq monitor cannot change tasks or queues"},
	{env: envSessionKeys, kind: kindSecret, cmds: []string{cmdServe, cmdDev},
		help:  "Vault session signing keys id:base64(32 bytes)[,...]: the first signs, all verify; without it serve offers no Vault page and no sessions",
		helps: map[string]string{cmdDev: "Vault session signing keys (default: a fresh key for this run only)"}},
	{env: envPublicURL, kind: kindURL, cmds: []string{cmdServe, cmdDev},
		help:  "the fleet's external base URL; the OAuth callback to register at each provider is <url>/vault/callback (required with " + envSessionKeys + ")",
		helps: map[string]string{cmdDev: "the external base URL (default: the listen address)"}},
	{env: envRedirectURIs, kind: kindString, cmds: []string{cmdServe, cmdDev},
		help: "the redirect URIs a session may name, comma-separated: a URL with a path must match exactly; an origin (https://app.example.com) allows any path on it; https only, http for loopback"},

	// flags only
	{flag: "consumers", kind: kindInt, cmds: []string{cmdDev}, def: strconv.Itoa(sim.DefaultConsumers),
		min: strconv.Itoa(sim.MinConsumers), help: "demo consumers to seed"},
	{flag: "speed", kind: kindFloat, cmds: []string{cmdDev}, def: strconv.Itoa(sim.DefaultSpeed), positive: true,
		help: "time scale of the simulated providers (2 = twice as fast; above 1 is for tests)"},
	{flag: "summary", kind: kindDuration, cmds: []string{cmdDev}, def: "5s", min: "0s",
		help: "how often to print the summary line (0: never)"},
	{flag: "tenant-after", kind: kindDuration, cmds: []string{cmdDev}, def: "40s", min: "0s",
		help: "when demo Xero connections get their tenant chosen (some stay authorized)"},
	{flag: "progress", kind: kindDuration, cmds: []string{cmdReseal}, def: fmtDuration(defaultResealProgress), min: "0s",
		help: "how often to print progress (0: only at the end)"},
	{flag: "consumer", kind: kindString, cmds: []string{cmdEnqueue}, help: "consumer id (required)"},
	{flag: "connection", kind: kindString, cmds: []string{cmdEnqueue},
		help: "connection id, unified_api+service_id, e.g. crm+salesforce (required)"},
	{flag: "queue", kind: kindChoice, choices: enqueueQueues, cmds: []string{cmdEnqueue}, defNote: "critical",
		help: "queue of the task"},
}

// fmtDuration writes d as a person would: 2m, not 2m0s.
func fmtDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
