// Package worker runs the asynq server of the fleet: the handlers that
// validate connections against their integration's check endpoint and
// refresh their OAuth tokens, and apply what they learn to the store.
//
// # Life cycle
//
// Like asynq's own components, a Worker has a Start(ctx) that returns once
// its asynq server runs and a Shutdown that stops it gracefully: no new
// token exchange starts, asynq gives in-flight tasks ShutdownTimeout and
// puts the rest back, handlers waiting for Redis stop waiting, and the
// exchanges and handlers still running are waited for, so that the caller
// may close Redis afterwards. Run(ctx) is Start, waiting for ctx, then
// Shutdown. A Worker runs once.
//
// # Verdicts
//
// A check request is built from the catalog (URL, headers, credentials per
// the integration's auth scheme) and sent only to hosts the catalog allows,
// redirects included. Its answer is classified as DESIGN.md's "Verdicts"
// table says:
//
//   - 2xx: valid, unless the catalog's assertion on the JSON body fails
//     (invalid, reason assertion_failed);
//   - a status the catalog lists as an auth failure (default 401, 403):
//     invalid, reason credentials_rejected (misconfigured_account for 404);
//   - 429: transient, retried after its Retry-After;
//   - 5xx, timeouts, DNS, connection and TLS errors, anything else:
//     transient, retried with exponential backoff and full jitter;
//   - the consumer's own misconfiguration: a request its settings or
//     credentials make impossible (nothing sent) is an invalid verdict,
//     reason misconfigured_account; a redirect the catalog refuses, or a
//     host chosen by its settings that does not resolve or refuses
//     connections, is recorded on that connection alone (health
//     misconfigured, state kept) and never counts in the breaker.
//
// The invalid-wave guard (guardFlip, catalog invalid_wave) counts only
// verdicts that would flip a connection to invalid, after confirmation,
// from a provider's answer, and holds those over the threshold of a
// sliding window.
//
// Valid and invalid verdicts are applied with compare-and-set on the
// credentials revision read before the check; a verdict for credentials
// that changed meanwhile is dropped and counted. Transient results never
// change a connection's state: they are recorded (health degraded) and the
// task returns an error so that asynq retries it.
//
// An OAuth check that is rejected while the access token is expired or
// close to expiry refreshes the token first, through the same exactly-once
// path as the refresh task, and checks once more before deciding.
//
// # Token refresh
//
// One refresh per connection at a time, fleet wide: a Redis lock
// (SET NX PX with a random token, released by compare-and-delete), and the
// connection is read again once the lock is held, so a token that somebody
// else refreshed meanwhile is not refreshed twice. New tokens are stored
// before anything else. invalid_grant, invalid_client and
// unauthorized_client are an invalid verdict (reason
// refresh_token_revoked), unless the refresh token changed meanwhile.
//
// # Protection of providers
//
// A circuit breaker per integration stops calling a provider whose checks
// fail transiently en masse (provider trouble only: 5xx, timeouts,
// connection errors on the provider's own hosts), and a fleet-wide rate limit per integration
// (in Redis) keeps all workers together under the catalog's limit. Tasks
// held back by either are retried later without using up a retry.
//
// # Metrics
//
// Registered on Config.Registerer, labelled by integration, never by
// connection or consumer: vaultfleet_checks_total{integration,outcome}
// (valid, invalid, transient, rate_limited: a provider 429 or the fleet's
// own limit, misconfigured: the consumer's own settings made the check
// fail, skipped: no request made), vaultfleet_invalid_verdicts_held_total, vaultfleet_check_duration_seconds,
// vaultfleet_state_transitions_total{integration,from,to},
// vaultfleet_token_refreshes_total{integration,outcome} (refreshed,
// revoked, transient, skipped, lost_race),
// vaultfleet_verdicts_dropped_total{reason}, vaultfleet_circuit_open, and
// per task vaultfleet_tasks_processed_total{queue,task_type,outcome}
// (success, retry, deferred, archived, canceled) and
// vaultfleet_task_duration_seconds{task_type}.
//
// # Secrets
//
// No token, key or password appears in a log line, a task result, a metric
// label or an error; URLs are logged as scheme://host/path only, since a
// query string may carry an API key.
package worker
