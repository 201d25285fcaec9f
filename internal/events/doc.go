// Package events turns the state-change stream into signed webhooks.
//
// The store appends one entry per state or health change to the Redis
// stream vaultfleet:events (state.DefaultEventStream). A Relay follows the
// stream in a consumer group (default "webhooks") and, for each entry and
// each subscription whose filter matches, enqueues a webhook:deliver task
// (tasks.NewWebhookEventTask) that carries the event itself (it holds no
// secret), so that a delivery never depends on the capped stream still
// holding the entry while it retries for hours; the task id is the
// delivery's idempotency key;
// it acknowledges the entry only after every task is enqueued, and claims
// entries a dead relay left unacknowledged (XAUTOCLAIM), so nothing is lost.
//
// The DeliveryHandler takes the event from the task (tasks enqueued by an
// older relay name it by id only and are read back from the stream), POSTs
// it as JSON
// (Webhook) with the headers X-Vaultfleet-Event, X-Vaultfleet-Idempotency-Key
// (the same on every attempt) and X-Vaultfleet-Signature
// ("t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>"), and lets asynq
// retry anything but a 2xx (delivered) or 410 (subscription gone). Receivers
// check requests with Verify, which rejects stale timestamps.
//
// Subscriptions come from a YAML file named by VAULTFLEET_WEBHOOKS
// (LoadSubscriptions); each names the environment variable holding its
// signing secret, and its URL must be https to a public host unless
// allow_insecure is set (development).
package events
