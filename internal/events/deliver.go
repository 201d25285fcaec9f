package events

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vaultfleet/vaultfleet/internal/netguard"
	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Defaults of DeliveryConfig.
const (
	DefaultDeliveryTimeout  = 10 * time.Second
	DefaultMaxResponseBytes = 64 << 10
	// MaxRetryAfter caps a receiver's Retry-After.
	MaxRetryAfter = time.Hour
)

// Delivery outcomes, the values of the outcome label of
// vaultfleet_webhook_deliveries_total.
const (
	OutcomeDelivered = "delivered"
	OutcomeFailed    = "failed"
	OutcomeGone      = "gone"
	OutcomeDropped   = "dropped"
)

// ErrEventGone means the event is no longer in the stream (trimmed by
// MAXLEN): the delivery is archived.
var ErrEventGone = errors.New("events: event no longer in the stream")

// ErrSubscriptionGone means the receiver answered 410 Gone: the delivery
// is archived.
var ErrSubscriptionGone = errors.New("events: receiver answered 410 Gone")

// ErrUnknownSubscription means a task names a subscription that is not
// configured (any more): the delivery is archived.
var ErrUnknownSubscription = errors.New("events: subscription not configured")

// Webhook is the JSON body POSTed to a receiver.
type Webhook struct {
	// ID is the idempotency key: the same on every attempt.
	ID        string      `json:"id"`
	Type      string      `json:"type"`
	CreatedAt time.Time   `json:"created_at"`
	Data      WebhookData `json:"data"`
}

// WebhookData describes the change.
type WebhookData struct {
	ConnectionID string `json:"connection_id"`
	ConsumerID   string `json:"consumer_id"`
	ServiceID    string `json:"service_id"`
	UnifiedAPI   string `json:"unified_api"`
	StateBefore  string `json:"state_before"`
	StateAfter   string `json:"state_after"`
	HealthBefore string `json:"health_before"`
	HealthAfter  string `json:"health_after"`
	Reason       string `json:"reason"`
	Version      int64  `json:"version"`
}

// EntryReader reads one entry of the event stream by id (ok false: no
// longer held); *state.EventStream is one.
type EntryReader interface {
	Entry(ctx context.Context, id string) (e state.StreamEntry, ok bool, err error)
}

var _ EntryReader = (*state.EventStream)(nil)

// DeliveryConfig configures the webhook:deliver handler. Events is
// required.
type DeliveryConfig struct {
	// Events reads back the event of a task that does not carry it (a
	// version 1 task): state.NewEventStream, the stream the store appends
	// to.
	Events EntryReader
	// Subscriptions by name; a task for another name is archived.
	Subscriptions []Subscription
	// HTTPClient, if set, replaces the built-in clients (tests). The
	// built-in ones time out, follow only 307/308 redirects to the same
	// host, use no proxy, and refuse to dial loopback, private or
	// link-local addresses unless the subscription allows insecure.
	HTTPClient *http.Client
	// Timeout of one attempt. If zero, DefaultDeliveryTimeout.
	Timeout time.Duration
	// MaxResponseBytes read from a response. If zero,
	// DefaultMaxResponseBytes.
	MaxResponseBytes int64
	// Logger, if nil, discards.
	Logger *slog.Logger
	// Registerer receives vaultfleet_webhook_deliveries_total. If nil, not
	// exported.
	Registerer prometheus.Registerer
	// NowFunc stamps signatures. If nil, time.Now.
	NowFunc func() time.Time
}

// DeliveryHandler is the asynq handler of webhook:deliver tasks.
type DeliveryHandler struct {
	cfg      DeliveryConfig
	subs     map[string]*Subscription
	strict   *http.Client
	insecure *http.Client
	log      *slog.Logger
	outcomes *prometheus.CounterVec
}

var _ asynq.Handler = (*DeliveryHandler)(nil)

// NewDeliveryHandler validates cfg and returns the webhook:deliver handler.
// Register it with mux.Handle(tasks.TypeWebhookDeliver, h) and serve the
// tasks.QueueEvents queue; RetryDelay is the backoff meant for it.
func NewDeliveryHandler(cfg DeliveryConfig) (*DeliveryHandler, error) {
	if cfg.Events == nil {
		return nil, errors.New("events: DeliveryConfig.Events is required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultDeliveryTimeout
	}
	if cfg.MaxResponseBytes <= 0 {
		cfg.MaxResponseBytes = DefaultMaxResponseBytes
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	h := &DeliveryHandler{cfg: cfg, subs: map[string]*Subscription{},
		log: cfg.Logger.With(slog.String("component", "webhook_delivery"))}
	for i := range cfg.Subscriptions {
		s := &cfg.Subscriptions[i]
		if _, dup := h.subs[s.Name]; dup || !subscriptionNameRE.MatchString(s.Name) {
			return nil, fmt.Errorf("events: subscription name %q invalid or listed twice", s.Name)
		}
		if err := CheckURL(s.URL, s.AllowInsecure); err != nil {
			return nil, fmt.Errorf("events: webhook %q: url: %w", s.Name, err)
		}
		if s.Secret == "" {
			return nil, fmt.Errorf("events: webhook %q: no signing secret", s.Name)
		}
		if s.Format != "" && s.Format != FormatVaultfleet && s.Format != FormatApideck {
			return nil, fmt.Errorf("events: webhook %q: format %q is not one of %s, %s", s.Name, s.Format, FormatVaultfleet, FormatApideck)
		}
		h.subs[s.Name] = s
	}
	if cfg.HTTPClient != nil {
		h.strict, h.insecure = cfg.HTTPClient, cfg.HTTPClient
	} else {
		h.strict, h.insecure = newHTTPClient(cfg.Timeout, true), newHTTPClient(cfg.Timeout, false)
	}
	h.outcomes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vaultfleet_webhook_deliveries_total",
		Help: "Webhook delivery attempts by outcome: delivered (2xx), failed (retried), gone (410, archived), dropped (event trimmed, subscription unknown, malformed task).",
	}, []string{"outcome"})
	for _, o := range []string{OutcomeDelivered, OutcomeFailed, OutcomeGone, OutcomeDropped} {
		h.outcomes.WithLabelValues(o)
	}
	if err := cfg.Registerer.Register(h.outcomes); err != nil {
		return nil, err
	}
	return h, nil
}

var errDialNotAllowed = errors.New("events: webhook target resolves to a loopback, private, link-local or reserved address")

func newHTTPClient(timeout time.Duration, strict bool) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	if strict {
		// Checked on the address actually dialled, so that a public name
		// resolving to an internal address is refused too.
		d.Control = func(_, address string, _ syscall.RawConn) error {
			if !netguard.PublicDialAddr(address) {
				return errDialNotAllowed
			}
			return nil
		}
	}
	tr := &http.Transport{
		Proxy:                 nil,
		DialContext:           d.DialContext,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: timeout,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   8,
	}
	return &http.Client{Transport: tr, Timeout: timeout, CheckRedirect: checkRedirect}
}

// checkRedirect follows only 307 and 308 (which keep the method and body)
// to the same scheme and host, at most 3 times; any other redirect is
// returned as the response (a failed attempt).
func checkRedirect(req *http.Request, via []*http.Request) error {
	if req.Response != nil && req.Response.StatusCode != http.StatusTemporaryRedirect &&
		req.Response.StatusCode != http.StatusPermanentRedirect {
		return http.ErrUseLastResponse
	}
	if len(via) >= 3 {
		return errors.New("events: too many redirects")
	}
	if req.URL.Scheme != via[0].URL.Scheme || req.URL.Host != via[0].URL.Host {
		return fmt.Errorf("%w: redirect to another host", ErrURLNotAllowed)
	}
	return nil
}

// CloseIdleConnections closes the idle keep-alive connections of the
// handler's HTTP clients (at shutdown).
func (h *DeliveryHandler) CloseIdleConnections() {
	h.strict.CloseIdleConnections()
	h.insecure.CloseIdleConnections()
}

// ProcessTask delivers one event to one subscription.
func (h *DeliveryHandler) ProcessTask(ctx context.Context, t *asynq.Task) error {
	p, err := tasks.ParseWebhookPayload(t.Payload())
	if err != nil {
		h.outcomes.WithLabelValues(OutcomeDropped).Inc()
		return fmt.Errorf("events: %w: %w", err, asynq.SkipRetry)
	}
	sub, ok := h.subs[p.Subscription]
	if !ok {
		h.outcomes.WithLabelValues(OutcomeDropped).Inc()
		return fmt.Errorf("%w: %q: %w", ErrUnknownSubscription, p.Subscription, asynq.SkipRetry)
	}
	key := tasks.IdempotencyKey(p.EventID, sub.Name)
	var wh Webhook
	if p.Event != nil {
		// Version 2: the task carries its event; the stream is not read.
		wh = webhookFromTask(key, p.EventID, *p.Event)
	} else {
		// Version 1 (enqueued before the upgrade): read the entry back.
		entry, ok, err := h.cfg.Events.Entry(ctx, p.EventID)
		if err != nil {
			return fmt.Errorf("events: %w", err)
		}
		if !ok {
			h.outcomes.WithLabelValues(OutcomeDropped).Inc()
			return fmt.Errorf("%w: %s (trimmed by MAXLEN before delivery to %s): %w", ErrEventGone, p.EventID, sub.Name, asynq.SkipRetry)
		}
		if wh, err = webhookFromEntry(key, entry); err != nil {
			h.outcomes.WithLabelValues(OutcomeDropped).Inc()
			return fmt.Errorf("events: %w: %w", err, asynq.SkipRetry)
		}
	}
	attempt := 1
	if n, ok := asynq.GetRetryCount(ctx); ok {
		attempt = n + 1
	}
	body, err := encodeWebhook(sub, wh, p.EventID, attempt)
	if err != nil {
		return fmt.Errorf("events: encode: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, sub.URL, bytes.NewReader(body))
	if err != nil {
		h.outcomes.WithLabelValues(OutcomeDropped).Inc()
		return fmt.Errorf("events: webhook %s: bad url: %w", sub.Name, asynq.SkipRetry)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "vaultfleet-webhooks/1")
	req.Header.Set(HeaderEvent, wh.Type)
	req.Header.Set(HeaderIdempotencyKey, key)
	req.Header.Set(HeaderAttempt, strconv.Itoa(attempt))
	req.Header.Set(HeaderSignature, Sign(sub.Secret, h.cfg.NowFunc(), body))
	setFormatHeaders(req.Header, sub, wh, key, body)
	client := h.strict
	if sub.AllowInsecure {
		client = h.insecure
	}
	logAttrs := []any{slog.String("subscription", sub.Name), slog.String("event_id", p.EventID),
		slog.String("event_type", wh.Type), slog.Int("attempt", attempt)}
	resp, err := client.Do(req)
	if err != nil {
		h.outcomes.WithLabelValues(OutcomeFailed).Inc()
		err = fmt.Errorf("events: deliver to %s: %s", sub.Name, redact.URLError(err))
		h.log.WarnContext(ctx, "webhook delivery failed", append(logAttrs, slog.String("error", err.Error()))...)
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, h.cfg.MaxResponseBytes))
	_ = resp.Body.Close()
	logAttrs = append(logAttrs, slog.Int("http_status", resp.StatusCode))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		h.outcomes.WithLabelValues(OutcomeDelivered).Inc()
		h.log.DebugContext(ctx, "webhook delivered", logAttrs...)
		return nil
	case resp.StatusCode == http.StatusGone:
		h.outcomes.WithLabelValues(OutcomeGone).Inc()
		h.log.WarnContext(ctx, "webhook receiver answered 410 Gone; delivery archived", logAttrs...)
		return fmt.Errorf("%w: %s: %w", ErrSubscriptionGone, sub.Name, asynq.SkipRetry)
	}
	h.outcomes.WithLabelValues(OutcomeFailed).Inc()
	h.log.WarnContext(ctx, "webhook delivery failed", logAttrs...)
	err = fmt.Errorf("events: deliver to %s: HTTP %d", sub.Name, resp.StatusCode)
	if d, ok := retry.ParseAfter(resp.Header.Get("Retry-After"), h.cfg.NowFunc()); ok &&
		(resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable) {
		return &RetryAfterError{After: min(d, MaxRetryAfter), Err: err}
	}
	return err
}

// webhookFromEntry builds the body from a stream entry written by the
// store (read with state.ParseEvent).
func webhookFromEntry(key string, m state.StreamEntry) (Webhook, error) {
	e, err := m.Event()
	if err != nil {
		return Webhook{}, err
	}
	return webhookFromTask(key, m.ID, TaskEvent(e)), nil
}

// webhookFromTask builds the body from the event a task carries; the same
// event gives the same body whether it was carried or read back.
func webhookFromTask(key, eventID string, e tasks.WebhookEvent) Webhook {
	created := e.Time.UTC()
	if e.Time.IsZero() {
		ms, _, _ := strings.Cut(eventID, "-")
		n, _ := strconv.ParseInt(ms, 10, 64)
		created = time.UnixMilli(n).UTC()
	}
	return Webhook{
		ID:        key,
		Type:      e.Type,
		CreatedAt: created,
		Data: WebhookData{
			ConnectionID: e.ConnectionID, ConsumerID: e.ConsumerID,
			ServiceID: e.ServiceID, UnifiedAPI: e.UnifiedAPI,
			StateBefore: e.StateBefore, StateAfter: e.StateAfter,
			HealthBefore: e.HealthBefore, HealthAfter: e.HealthAfter,
			Reason: e.Reason, Version: e.Version,
		},
	}
}

// RetryAfterError is a failed attempt whose receiver asked to wait: the
// fleet's one retry.AfterError, which the worker honours too.
type RetryAfterError = retry.AfterError

// RetryDelay is the asynq RetryDelayFunc meant for webhook:deliver tasks:
// the receiver's Retry-After when it sent one (capped at MaxRetryAfter),
// otherwise 10 s doubling per retry up to one hour, with ±20% jitter. With
// tasks.WebhookMaxRetry retries a delivery keeps trying for about ten
// hours. Use it for tasks.TypeWebhookDeliver in the worker's
// RetryDelayFunc.
func RetryDelay(n int, err error, _ *asynq.Task) time.Duration {
	var ra *RetryAfterError
	if errors.As(err, &ra) {
		return max(ra.After, time.Second)
	}
	return retry.Spread(retry.Exp(n, 10*time.Second, time.Hour), 0.2, rand.Float64())
}
