// Package tasks is the contract between vaultfleet and the services that
// enqueue its work: task type names, payloads and constructors with the
// right queue, dedupe and timeouts. Another service imports it and enqueues
// with its own asynq client.
//
// Payloads carry ids and a payload version, never a secret: the Asynq web
// monitor shows them. A webhook delivery also carries its event (ids,
// states, healths, reason, version, time: no secret either), so that it
// does not depend on the capped event stream still holding it. Type names are a wire format: new ones are added,
// old ones are never renamed.
package tasks

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/hibiken/asynq"
	"github.com/vaultfleet/vaultfleet/internal/redact"
)

// Task types.
const (
	TypeValidate       = "connection:validate"
	TypeRefreshToken   = "connection:refresh_token"
	TypeWebhookDeliver = "webhook:deliver"
)

// Queues, most urgent first, with the weights the worker serves them with.
const (
	QueueCritical = "critical"
	QueueDefault  = "default"
	QueueLow      = "low"
	QueueEvents   = "events"
)

// Queues returns each queue's priority weight, in a fresh map that the
// caller (asynq.Config.Queues) may keep.
func Queues() map[string]int {
	return map[string]int{QueueCritical: 6, QueueDefault: 3, QueueLow: 1, QueueEvents: 2}
}

// PayloadVersion is the version of the payloads this package writes.
const PayloadVersion = 1

// Timeouts and retries. Timeouts are whole seconds: asynq drops a timeout
// under one second.
const (
	ValidateTimeout  = 60 * time.Second
	ValidateMaxRetry = 12
	RefreshTimeout   = 60 * time.Second
	RefreshMaxRetry  = 10
	WebhookTimeout   = 30 * time.Second
	WebhookMaxRetry  = 16
)

// Retention: how long a completed task stays in Redis with its result, so
// the Asynq monitor can show it (without retention asynq deletes a task the
// moment it succeeds). asynq fixes retention at enqueue: a handler cannot
// keep a task because its verdict changed a state, so retention follows why
// the task was enqueued. A kept task still holds its task id (a second
// enqueue with that id is refused with asynq.ErrTaskIDConflict until the
// retention ends), so only tasks whose id is not legitimately reused soon
// are kept: ids from a due time, a credentials revision, a version, an
// event, or no key at all (a random id). Refresh tasks are never kept:
// every refresh of a connection has the same id (RefreshTaskID), and a kept
// one would block the connection's next refresh.
const (
	// RetentionRequested keeps the validations somebody is waiting for:
	// on demand, after a credentials change or an enable. Few per hour.
	RetentionRequested = 24 * time.Hour
	// RetentionScheduled keeps periodic checks (the bulk of the traffic)
	// and confirming checks long enough to open one in the monitor after it
	// ran; a state they changed stays findable in the event stream. A
	// confirming check's id (revision and step) comes back when a valid
	// verdict resets the confirmation and the credentials fail again, so it
	// is kept no longer than this.
	RetentionScheduled = 5 * time.Minute
	// RetentionWebhook keeps webhook deliveries, one per event and
	// subscription.
	RetentionWebhook = time.Hour
)

// retentionFor is the retention of a connection task (see RetentionRequested).
func retentionFor(typ string, reason Reason) time.Duration {
	switch {
	case typ == TypeRefreshToken:
		return 0
	case reason == ReasonScheduled, reason == ReasonConfirm:
		return RetentionScheduled
	}
	return RetentionRequested
}

// ErrMalformed wraps every payload parse error. The worker archives such a
// task at once instead of retrying it.
var ErrMalformed = errors.New("tasks: malformed payload")

// Reason says why a task was enqueued; it picks the queue.
type Reason string

// Reasons.
const (
	// ReasonScheduled: a periodic check or refresh-ahead from the scheduler.
	ReasonScheduled Reason = "scheduled"
	// ReasonCredentialsChanged: credentials or a check setting changed.
	ReasonCredentialsChanged Reason = "credentials_changed"
	// ReasonEnabled: the connection was enabled again.
	ReasonEnabled Reason = "enabled"
	// ReasonOnDemand: somebody asked ("validate now", vaultfleet enqueue).
	ReasonOnDemand Reason = "on_demand"
	// ReasonConfirm: a check confirming an invalid verdict.
	ReasonConfirm Reason = "confirm"
	// ReasonExpired: the access token has expired (refresh).
	ReasonExpired Reason = "expired"
)

var reasons = map[Reason]bool{ReasonScheduled: true, ReasonCredentialsChanged: true,
	ReasonEnabled: true, ReasonOnDemand: true, ReasonConfirm: true, ReasonExpired: true}

// ConnectionPayload is the payload of connection:validate and
// connection:refresh_token.
type ConnectionPayload struct {
	// V is the payload version.
	V            int    `json:"v"`
	ConsumerID   string `json:"consumer_id"`
	ConnectionID string `json:"connection_id"`
	Reason       Reason `json:"reason"`
	// Key makes the task id: the due time (unix seconds) of a scheduled
	// task, the credentials revision of a change, the token expiry of a
	// refresh. Tasks with the same type, connection and key are one.
	Key string `json:"key,omitempty"`
}

// WebhookPayloadVersion is the version of the webhook:deliver payloads
// this package writes: 2 carries the event itself. Version 1 payloads
// (event id only; the delivery reads the event from the stream) still
// parse.
const WebhookPayloadVersion = 2

// WebhookPayload is the payload of webhook:deliver.
type WebhookPayload struct {
	V int `json:"v"`
	// EventID is the event's stream entry id.
	EventID string `json:"event_id"`
	// Subscription names the webhook subscription.
	Subscription string `json:"subscription"`
	// Event is the event to deliver (version 2), so a delivery never
	// depends on the stream still holding the entry (it is capped, and
	// retries span hours). Nil in version 1 payloads.
	Event *WebhookEvent `json:"event,omitempty"`
}

// WebhookEvent is a state-change event as a delivery carries it. It holds
// no secret: ids, states, healths, the reason, the version and the time.
type WebhookEvent struct {
	Type         string    `json:"type"`
	ConnectionID string    `json:"connection_id"`
	ConsumerID   string    `json:"consumer_id"`
	ServiceID    string    `json:"service_id,omitempty"`
	UnifiedAPI   string    `json:"unified_api,omitempty"`
	StateBefore  string    `json:"state_before,omitempty"`
	StateAfter   string    `json:"state_after,omitempty"`
	HealthBefore string    `json:"health_before,omitempty"`
	HealthAfter  string    `json:"health_after,omitempty"`
	Reason       string    `json:"reason,omitempty"`
	Version      int64     `json:"version,omitempty"`
	Time         time.Time `json:"time,omitzero"`
}

// Limits of a carried event.
const (
	// maxReasonLen bounds the reason (the store keeps 200 characters).
	maxReasonLen = 1024
)

var (
	eventTypeRE = regexp.MustCompile(`^[a-z][a-z0-9._]{0,63}$`)
	slugRE      = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)
	wordRE      = regexp.MustCompile(`^[a-z_]{0,32}$`)
)

func (e *WebhookEvent) validate() error {
	switch {
	case !eventTypeRE.MatchString(e.Type):
		return fmt.Errorf("%w: event.type missing or not an event type", ErrMalformed)
	case !consumerRE.MatchString(e.ConsumerID):
		return fmt.Errorf("%w: event.consumer_id missing or not a valid id", ErrMalformed)
	case !connectionRE.MatchString(e.ConnectionID):
		return fmt.Errorf("%w: event.connection_id must look like unified_api+service_id", ErrMalformed)
	case e.ServiceID != "" && !slugRE.MatchString(e.ServiceID), e.UnifiedAPI != "" && !slugRE.MatchString(e.UnifiedAPI):
		return fmt.Errorf("%w: event.service_id or event.unified_api not a valid id", ErrMalformed)
	case !wordRE.MatchString(e.StateBefore), !wordRE.MatchString(e.StateAfter),
		!wordRE.MatchString(e.HealthBefore), !wordRE.MatchString(e.HealthAfter):
		return fmt.Errorf("%w: event state or health not a valid value", ErrMalformed)
	case len(e.Reason) > maxReasonLen || !utf8.ValidString(e.Reason):
		return fmt.Errorf("%w: event.reason longer than %d bytes or not UTF-8", ErrMalformed, maxReasonLen)
	case e.Version < 0:
		return fmt.Errorf("%w: event.version negative", ErrMalformed)
	}
	return nil
}

var (
	consumerRE     = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$`)
	connectionRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}\+[a-z0-9][a-z0-9_-]{0,63}$`)
	keyRE          = regexp.MustCompile(`^[A-Za-z0-9._:-]{0,64}$`)
	eventIDRE      = regexp.MustCompile(`^[0-9]{1,20}-[0-9]{1,20}$`)
	subscriptionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// ValidConsumerID reports whether id is a valid consumer id: 1 to 128
// characters of letters, digits and . _ : @ -, starting with a letter or
// digit.
func ValidConsumerID(id string) bool { return consumerRE.MatchString(id) }

// ValidConnectionID reports whether id is "{unified_api}+{service_id}" in
// lower case.
func ValidConnectionID(id string) bool { return connectionRE.MatchString(id) }

func (p ConnectionPayload) validate() error {
	switch {
	case p.V != PayloadVersion:
		return fmt.Errorf("%w: unsupported payload version %d (want %d)", ErrMalformed, p.V, PayloadVersion)
	case !consumerRE.MatchString(p.ConsumerID):
		return fmt.Errorf("%w: consumer_id missing or not a valid id", ErrMalformed)
	case !connectionRE.MatchString(p.ConnectionID):
		return fmt.Errorf("%w: connection_id must look like unified_api+service_id", ErrMalformed)
	case !reasons[p.Reason]:
		return fmt.Errorf("%w: unknown reason %q", ErrMalformed, redact.Truncate(string(p.Reason), 64))
	case !keyRE.MatchString(p.Key):
		return fmt.Errorf("%w: key not a valid dedupe key", ErrMalformed)
	}
	return nil
}

// QueueFor is the queue a connection task of type typ enqueued for reason
// r goes to (see queueFor).
func QueueFor(typ string, r Reason) string { return queueFor(typ, r) }

// queueFor picks the queue: what a user is waiting for is critical, every
// token refresh is critical, confirmations default, periodic checks low.
// Refreshes share one queue whatever their reason because asynq dedupes
// task ids per queue: one queue is what makes RefreshTaskID one chain.
func queueFor(typ string, r Reason) string {
	if typ == TypeRefreshToken {
		return QueueCritical
	}
	switch r {
	case ReasonCredentialsChanged, ReasonEnabled, ReasonOnDemand, ReasonExpired:
		return QueueCritical
	case ReasonConfirm:
		return QueueDefault
	}
	return QueueLow
}

// NewValidateTask returns a connection:validate task. key dedupes (see
// ConnectionPayload.Key); an empty key means no dedupe (on-demand).
func NewValidateTask(consumerID, connectionID string, reason Reason, key string) (*asynq.Task, error) {
	return newConnectionTask(TypeValidate, consumerID, connectionID, reason, key,
		asynq.Timeout(ValidateTimeout), asynq.MaxRetry(ValidateMaxRetry))
}

// NewRefreshTask returns a connection:refresh_token task. Every refresh
// task of one connection has the same task id, RefreshTaskID, whatever its
// key: however many triggers, scheduler leases and replicas enqueue it,
// one retry chain exists per connection at a time (a second enqueue gets
// asynq.ErrTaskIDConflict). key (e.g. the token's expiry) is kept in the
// payload for the record.
func NewRefreshTask(consumerID, connectionID string, reason Reason, key string) (*asynq.Task, error) {
	return newConnectionTask(TypeRefreshToken, consumerID, connectionID, reason, key,
		asynq.Timeout(RefreshTimeout), asynq.MaxRetry(RefreshMaxRetry),
		asynq.TaskID(RefreshTaskID(consumerID, connectionID)))
}

// RefreshTaskID is the task id of every refresh task of a connection.
func RefreshTaskID(consumerID, connectionID string) string {
	return TypeRefreshToken + ":" + consumerID + "|" + connectionID
}

func newConnectionTask(typ, consumerID, connectionID string, reason Reason, key string, opts ...asynq.Option) (*asynq.Task, error) {
	p := ConnectionPayload{V: PayloadVersion, ConsumerID: consumerID, ConnectionID: connectionID, Reason: reason, Key: key}
	if err := p.validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	opts = append(opts, asynq.Queue(queueFor(typ, reason)))
	if d := retentionFor(typ, reason); d > 0 {
		opts = append(opts, asynq.Retention(d))
	}
	if key != "" && typ != TypeRefreshToken {
		opts = append(opts, asynq.TaskID(TaskID(typ, consumerID, connectionID, key)))
	}
	return asynq.NewTask(typ, b, opts...), nil
}

// TaskID is the dedupe id of a connection task: a second enqueue with the
// same id is refused with asynq.ErrTaskIDConflict while the first is
// pending, scheduled, retrying, archived or kept completed (retention;
// treat that as "already queued").
func TaskID(typ, consumerID, connectionID, key string) string {
	return typ + ":" + consumerID + "|" + connectionID + ":" + key
}

// ParseConnectionPayload decodes and checks a validate or refresh payload.
// Errors wrap ErrMalformed and never echo secrets (payloads hold none).
func ParseConnectionPayload(b []byte) (ConnectionPayload, error) {
	var p ConnectionPayload
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: %s", ErrMalformed, jsonErr(err))
	}
	return p, p.validate()
}

// NewWebhookTask returns a version 1 webhook:deliver task, which names
// the event by its stream id only: its delivery reads the event from the
// stream, and is dropped if the stream was trimmed past it meanwhile.
// Prefer NewWebhookEventTask. The task id is the delivery's idempotency
// key: one per event and subscription.
func NewWebhookTask(eventID, subscription string) (*asynq.Task, error) {
	return newWebhookTask(WebhookPayload{V: 1, EventID: eventID, Subscription: subscription})
}

// NewWebhookEventTask returns a webhook:deliver task on the events queue
// that carries the event itself (payload version 2), so its delivery never
// reads the stream. The task id is the delivery's idempotency key, the
// same as NewWebhookTask's: one per event and subscription.
func NewWebhookEventTask(eventID, subscription string, e WebhookEvent) (*asynq.Task, error) {
	e.Time = e.Time.UTC()
	return newWebhookTask(WebhookPayload{V: WebhookPayloadVersion, EventID: eventID, Subscription: subscription, Event: &e})
}

func newWebhookTask(p WebhookPayload) (*asynq.Task, error) {
	eventID, subscription := p.EventID, p.Subscription
	if err := p.validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	return asynq.NewTask(TypeWebhookDeliver, b,
		asynq.Queue(QueueEvents), asynq.TaskID(IdempotencyKey(eventID, subscription)),
		asynq.Timeout(WebhookTimeout), asynq.MaxRetry(WebhookMaxRetry), asynq.Retention(RetentionWebhook)), nil
}

// IdempotencyKey identifies one delivery of one event to one subscription;
// it is sent with every attempt so receivers can drop repeats.
func IdempotencyKey(eventID, subscription string) string {
	return "webhook:" + subscription + ":" + eventID
}

func (p WebhookPayload) validate() error {
	switch {
	case p.V != 1 && p.V != WebhookPayloadVersion:
		return fmt.Errorf("%w: unsupported payload version %d (want 1 or %d)", ErrMalformed, p.V, WebhookPayloadVersion)
	case p.V == 1 && p.Event != nil:
		return fmt.Errorf("%w: a version 1 payload carries no event", ErrMalformed)
	case p.V == WebhookPayloadVersion && p.Event == nil:
		return fmt.Errorf("%w: a version %d payload carries its event", ErrMalformed, WebhookPayloadVersion)
	case !eventIDRE.MatchString(p.EventID):
		return fmt.Errorf("%w: event_id must be a stream id like 1700000000000-0", ErrMalformed)
	case !subscriptionRE.MatchString(p.Subscription):
		return fmt.Errorf("%w: subscription missing or not a valid name", ErrMalformed)
	}
	if p.Event != nil {
		return p.Event.validate()
	}
	return nil
}

// ParseWebhookPayload decodes and checks a webhook:deliver payload.
func ParseWebhookPayload(b []byte) (WebhookPayload, error) {
	var p WebhookPayload
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: %s", ErrMalformed, jsonErr(err))
	}
	return p, p.validate()
}

// jsonErr describes a decode error without quoting the input.
func jsonErr(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return "invalid JSON at offset " + strconv.FormatInt(se.Offset, 10)
	case errors.As(err, &te):
		return "field " + te.Field + " has the wrong type"
	}
	return "invalid JSON"
}
