package api

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/vaultfleet/vaultfleet/catalog"
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
}

func (e *apiError) Error() string { return e.code + ": " + e.msg }

func errf(status int, code, msg string) *apiError {
	return &apiError{status: status, code: code, msg: msg}
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
	var ae *apiError
	var fe *state.FieldError
	switch {
	case errors.As(err, &ae):
		writeError(w, ae.status, ae.code, ae.msg)
	case errors.Is(err, state.ErrNotFound):
		writeError(w, http.StatusNotFound, codeNotFound, "the consumer has not added this connection")
	case errors.Is(err, catalog.ErrUnknownIntegration):
		writeError(w, http.StatusNotFound, codeUnknownIntegration, "no integration with this unified API and service id")
	case errors.Is(err, state.ErrVersionConflict):
		writeError(w, http.StatusConflict, codeVersionConflict, "the connection's version is not the one in If-Match; read it again")
	case errors.Is(err, catalog.ErrHostNotAllowed):
		writeError(w, http.StatusUnprocessableEntity, codeHostNotAllowed, "a setting points at a host the integration does not allow")
	case errors.Is(err, catalog.ErrInvalidSetting):
		writeError(w, http.StatusBadRequest, codeInvalidSetting, "a setting has a value its type does not allow")
	case errors.As(err, &fe):
		writeError(w, http.StatusBadRequest, codeInvalidField, fe.Field+": "+fe.Msg)
	case errors.Is(r.Context().Err(), context.DeadlineExceeded):
		// The request's deadline (Config.RequestTimeout) passed: Redis
		// is slow or stalled.
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, codeServiceUnavailable, "the store did not answer in time; retry")
	case r.Context().Err() != nil && errors.Is(err, r.Context().Err()):
		// The client went away; nobody reads this.
		writeError(w, http.StatusServiceUnavailable, codeServiceUnavailable, "request cancelled")
	default:
		s.log.ErrorContext(r.Context(), "api: request failed",
			slog.String("route", r.Pattern), slog.String("error", err.Error()))
		writeError(w, http.StatusInternalServerError, codeInternal, "internal error; see the server log")
	}
}
