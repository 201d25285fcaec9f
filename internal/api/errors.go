package api

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

// Error codes of the envelope.
const (
	codeInvalidJSON         = "invalid_json"
	codeInvalidField        = "invalid_field"
	codeInvalidID           = "invalid_id"
	codeInvalidQuery        = "invalid_query"
	codeInvalidIfMatch      = "invalid_if_match"
	codeUnauthorized        = "unauthorized"
	codeNotFound            = "not_found"
	codeUnknownIntegration  = "unknown_integration"
	codeMethodNotAllowed    = "method_not_allowed"
	codeVersionConflict     = "version_conflict"
	codePayloadTooLarge     = "payload_too_large"
	codeUnsupportedMedia    = "unsupported_media_type"
	codeHostNotAllowed      = "host_not_allowed"
	codeNotOAuth            = "not_oauth"
	codeNoRefreshToken      = "no_refresh_token"
	codeConnectionDisabled  = "connection_disabled"
	codeIntegrationInactive = "integration_not_checkable"
	codeIncomplete          = "incomplete_connection"
	codeInternal            = "internal"
	codeEnqueueFailed       = "enqueue_failed"
	codeServiceUnavailable  = "unavailable"
	codeInvalidSetting      = "invalid_setting"
	// codeInvalidCredential: a credential value the store refuses (too
	// long, a control character, not valid UTF-8); 422 naming the field.
	codeInvalidCredential = "invalid_credential"
	codeUnreadable        = "credentials_unreadable"
	codeContention        = "write_contention"
)

// Retry-After of the 503 answers, in seconds.
const (
	// retryAfterContention: many concurrent writes of one connection
	// clear within moments.
	retryAfterContention = 1
	// retryAfterUnavailable: a Redis restart or failover takes seconds.
	retryAfterUnavailable = 5
)

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// apiError is an error with its HTTP status and envelope code. Messages
// never hold a credential value.
type apiError struct {
	status int
	code   string
	msg    string
	// retryAfter, if > 0, is sent as Retry-After (seconds).
	retryAfter int
}

func (e *apiError) Error() string { return e.code + ": " + e.msg }

func errf(status int, code, msg string) *apiError {
	return &apiError{status: status, code: code, msg: msg}
}

// unreadableMsg says why a connection's stored credentials cannot be used
// and what to do, naming the key id (never a secret).
func unreadableMsg(err error) string {
	const fix = " and cannot be opened: replace them in full with PUT (every credential field) or DELETE the connection"
	var ue *state.UnreadableError
	if !errors.As(err, &ue) || !errors.Is(err, secrets.ErrUnknownKey) {
		return "the stored credentials are corrupt or were sealed for another record" + fix
	}
	return "the stored credentials are sealed with a retired key (key id " + strconv.Quote(ue.KeyID) +
		", no longer in " + secrets.EnvKeys + ")" + fix
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, errorBody{Error: errorDetail{Code: code, Message: msg}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"code":"internal","message":"encoding the response failed"}}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// fail maps err to a status and writes the envelope. Store and catalog
// errors are mapped by kind; anything unexpected is a 500 whose detail only
// goes to the log.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	ae := s.classify(r, err)
	setRetryAfter(w, ae)
	writeError(w, ae.status, ae.code, ae.msg)
}

// setRetryAfter sends an error's Retry-After, if it has one.
func setRetryAfter(w http.ResponseWriter, ae *apiError) {
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(ae.retryAfter))
	}
}

// classify maps err to its status, code and message (shared by the /v1
// and /vault envelopes).
func (s *server) classify(r *http.Request, err error) *apiError {
	var ae *apiError
	var fe *state.FieldError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, state.ErrNotFound):
		return errf(http.StatusNotFound, codeNotFound, "the consumer has not added this connection")
	case errors.Is(err, catalog.ErrUnknownIntegration):
		return errf(http.StatusNotFound, codeUnknownIntegration, "no integration with this unified API and service id")
	case errors.Is(err, state.ErrVersionConflict):
		return errf(http.StatusConflict, codeVersionConflict, "the connection's version is not the one in If-Match; read it again")
	case errors.Is(err, catalog.ErrHostNotAllowed):
		return errf(http.StatusUnprocessableEntity, codeHostNotAllowed, "a setting points at a host the integration does not allow")
	case errors.Is(err, catalog.ErrInvalidSetting):
		return errf(http.StatusBadRequest, codeInvalidSetting, "a setting has a value its type does not allow")
	case errors.As(err, &fe) && errors.Is(err, state.ErrInvalidCredential):
		return errf(http.StatusUnprocessableEntity, codeInvalidCredential, fe.Field+": "+fe.Msg)
	case errors.As(err, &fe):
		return errf(http.StatusBadRequest, codeInvalidField, fe.Field+": "+fe.Msg)
	case errors.Is(err, state.ErrUnreadable):
		return errf(http.StatusConflict, codeUnreadable, unreadableMsg(err))
	case errors.Is(r.Context().Err(), context.DeadlineExceeded):
		// The request's deadline (Config.RequestTimeout) passed: Redis
		// is slow or stalled.
		e := errf(http.StatusServiceUnavailable, codeServiceUnavailable, "the store did not answer in time; retry")
		e.retryAfter = 1
		return e
	case r.Context().Err() != nil && errors.Is(err, r.Context().Err()):
		// The client went away; nobody reads this.
		return errf(http.StatusServiceUnavailable, codeServiceUnavailable, "request cancelled")
	case errors.Is(err, state.ErrContention):
		e := errf(http.StatusServiceUnavailable, codeContention, "too many concurrent writes of this connection; try again shortly")
		e.retryAfter = retryAfterContention
		return e
	case state.Unavailable(err):
		s.log.WarnContext(r.Context(), "api: store unavailable",
			slog.String("route", r.Pattern), slog.String("error", err.Error()))
		e := errf(http.StatusServiceUnavailable, codeServiceUnavailable, "the store is unavailable; try again shortly")
		e.retryAfter = retryAfterUnavailable
		return e
	}
	s.log.ErrorContext(r.Context(), "api: request failed",
		slog.String("route", r.Pattern), slog.String("error", err.Error()))
	return errf(http.StatusInternalServerError, codeInternal, "internal error; see the server log")
}
