// Package sim runs simulated integration providers and seeds demo
// connections for `vaultfleet dev`.
//
// Start opens one HTTP server per provider on a loopback port. Each one
// speaks like the real API it stands for, as far as the fleet can tell:
//
//   - salesforce: OAuth 2.0. GET /services/oauth2/userinfo with a bearer
//     token is the check; POST /services/oauth2/token (grant_type
//     refresh_token, client credentials as form parameters or HTTP basic)
//     answers without expires_in, like Salesforce, and rotates the refresh
//     token: a used one gets invalid_grant. Some demo refresh tokens are
//     revoked over time; access tokens expire after a few minutes and then
//     get 401 INVALID_SESSION_ID.
//   - bamboohr: API key. GET /api/gateway.php/{subdomain}/v1/meta/fields with
//     the key as basic-auth user: 200, 401 for a wrong or revoked key, 404 for
//     an unknown subdomain.
//   - xero: OAuth 2.0. GET /connections lists the tenants a bearer token
//     reaches; POST /connect/token rotates refresh tokens and keeps the
//     previous one usable for a grace period, like Xero.
//   - pipedrive: API key in the x-api-token header, GET /v1/users/me. It is
//     the flaky one: during outage windows it answers 502 and 503 with HTML
//     bodies and 429 with Retry-After: 1, whatever the key, and it never
//     rejects a valid key.
//
// Timings are shortened (Timings, Config.Speed) so that tokens expire,
// credentials get revoked and outages come and go within minutes.
// CatalogYAML returns a catalog whose entries point at the listeners,
// ClientEnv the OAuth client credentials the worker needs, and Seed writes
// demo consumers whose connections reach every state within the first
// minute. Every method of Providers is safe for concurrent use.
package sim
