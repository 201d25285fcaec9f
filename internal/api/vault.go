package api

// The /vault surface speaks Apideck Vault's own contract (vault.yml, and
// the @apideck/unify SDK generated from it) over the same store and
// handlers as /v1: Apideck's headers, envelopes, field types, status codes
// and error type names, so that an app written for Apideck Vault works
// unchanged. /v1 keeps vaultfleet's shapes.
//
//	GET    /vault/connections?api=&configured=
//	GET    /vault/connections/{unified_api}/{service_id}
//	PATCH  /vault/connections/{unified_api}/{service_id}
//	DELETE /vault/connections/{unified_api}/{service_id}
//	POST   /vault/connections/{unified_api}/{service_id}/import
//	POST   /vault/connections/{unified_api}/{service_id}/validate
//	POST   /vault/connections/{unified_api}/{service_id}/token
//	POST   /vault/consumers
//	GET    /vault/consumers?cursor=&limit=&filter[consumer_id]=
//	GET    /vault/consumers/{consumer_id}
//	PATCH  /vault/consumers/{consumer_id}
//	DELETE /vault/consumers/{consumer_id}
//
// Where Apideck is weak vaultfleet does not follow: no credential value is
// ever echoed (not in settings, not in form_fields), credentials are never
// deleted after refresh failures (credentials_expire_at is always 0).

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// Apideck request headers.
const (
	headerAppID      = "x-apideck-app-id"
	headerConsumerID = "x-apideck-consumer-id"
)

// VaultStore is what /vault uses of *state.Store beyond Store. When
// Config.Store does not implement it, /vault is not served.
type VaultStore interface {
	Store
	Create(ctx context.Context, ref state.Ref, in state.Input) (state.Change, error)
	StoreTokens(ctx context.Context, ref state.Ref, usedRefreshToken string, t state.Tokens) (state.Change, error)
	CreateConsumer(ctx context.Context, id string, metadata json.RawMessage) (*state.Consumer, error)
	UpdateConsumer(ctx context.Context, id string, metadata json.RawMessage) (*state.Consumer, error)
	EnsureConsumer(ctx context.Context, id string) (bool, error)
	GetConsumer(ctx context.Context, id string) (*state.Consumer, error)
	ListConsumers(ctx context.Context, prefix, cursor string, limit int) ([]*state.Consumer, string, error)
	DeleteConsumer(ctx context.Context, id string) ([]state.Change, error)
}

var _ VaultStore = (*state.Store)(nil)

// Apideck error type names.
const (
	typeRequestValidation        = "RequestValidationError"
	typeRequestHeadersValidation = "RequestHeadersValidationError"
	typeUnauthorized             = "UnauthorizedError"
	typeEntityNotFound           = "EntityNotFoundError"
	typeConflict                 = "ConflictError"
	typeInvalidState             = "InvalidStateError"
	typeMethodNotAllowed         = "MethodNotAllowedError"
	typeConnectorExecution       = "ConnectorExecutionError"
	typeServer                   = "ServerError"
)

// vaultErrorRef is the ref of every /vault error: where the differences
// from Apideck Vault are written down.
const vaultErrorRef = "https://github.com/vaultfleet/vaultfleet#coming-from-apideck-vault"

// vaultError is Apideck's error envelope.
type vaultError struct {
	StatusCode int    `json:"status_code"`
	Error      string `json:"error"`
	TypeName   string `json:"type_name"`
	Message    string `json:"message"`
	Detail     string `json:"detail"`
	Ref        string `json:"ref"`
}

// vaultOK is Apideck's success envelope.
type vaultOK struct {
	StatusCode int         `json:"status_code"`
	Status     string      `json:"status"`
	Data       any         `json:"data"`
	Meta       *vaultMeta  `json:"meta,omitempty"`
	Links      *vaultLinks `json:"links,omitempty"`
}

type vaultMeta struct {
	ItemsOnPage int          `json:"items_on_page"`
	Cursors     vaultCursors `json:"cursors"`
}

type vaultCursors struct {
	Previous *string `json:"previous"`
	Current  *string `json:"current"`
	Next     *string `json:"next"`
}

type vaultLinks struct {
	Previous *string `json:"previous"`
	Current  string  `json:"current"`
	Next     *string `json:"next"`
}

func writeVault(w http.ResponseWriter, status int, data any) {
	writeJSON(w, status, vaultOK{StatusCode: status, Status: "OK", Data: data})
}

// writeVaultError writes Apideck's error envelope. detail carries
// vaultfleet's own error code.
func writeVaultError(w http.ResponseWriter, status int, typeName, msg, detail string) {
	writeJSON(w, status, vaultError{StatusCode: status, Error: http.StatusText(status), TypeName: typeName,
		Message: msg, Detail: detail, Ref: vaultErrorRef})
}

// vaultTypeName is the Apideck type_name of a status.
func vaultTypeName(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return typeUnauthorized
	case status == http.StatusNotFound:
		return typeEntityNotFound
	case status == http.StatusConflict:
		return typeConflict
	case status == http.StatusUnprocessableEntity:
		return typeInvalidState
	case status == http.StatusMethodNotAllowed:
		return typeMethodNotAllowed
	case status == http.StatusBadGateway:
		return typeConnectorExecution
	case status >= 500:
		return typeServer
	}
	return typeRequestValidation
}

// vaultFail maps err as /v1 does and writes Apideck's envelope. A
// disabled connection is Apideck's InvalidStateError (422), not /v1's 409.
func (s *server) vaultFail(w http.ResponseWriter, r *http.Request, err error) {
	ae := s.classify(r, err)
	setRetryAfter(w, ae)
	status := ae.status
	if ae.code == codeConnectionDisabled {
		status = http.StatusUnprocessableEntity
	}
	typeName := vaultTypeName(status)
	if ae.code == codeInvalidHeader {
		typeName = typeRequestHeadersValidation
	}
	writeVaultError(w, status, typeName, ae.msg, ae.code)
}

// codeInvalidHeader: a required x-apideck-* header is missing or malformed.
const codeInvalidHeader = "invalid_header"

// vaultRoute is one /vault pattern; consumer says whether the route needs
// x-apideck-consumer-id.
type vaultRoute struct {
	method, path string
	consumer     bool
	h            http.HandlerFunc
}

const (
	pathVaultConnections = "/vault/connections"
	pathVaultConnection  = "/vault/connections/{unified_api}/{service_id}"
	pathVaultImport      = pathVaultConnection + "/import"
	pathVaultValidate    = pathVaultConnection + "/validate"
	pathVaultToken       = pathVaultConnection + "/token"
	pathVaultConsumers   = "/vault/consumers"
	pathVaultConsumer    = "/vault/consumers/{consumer_id}"
)

func (s *server) vaultRoutes() []vaultRoute {
	return []vaultRoute{
		{http.MethodGet, pathVaultConnections, true, s.vaultListConnections},
		{http.MethodGet, pathVaultConnection, true, s.onVaultConnection(s.vaultGetConnection)},
		{http.MethodPatch, pathVaultConnection, true, s.onVaultConnection(s.vaultUpdateConnection)},
		{http.MethodDelete, pathVaultConnection, true, s.onVaultConnection(s.vaultDeleteConnection)},
		{http.MethodPost, pathVaultImport, true, s.onVaultConnection(s.vaultImport)},
		{http.MethodPost, pathVaultValidate, true, s.onVaultConnection(s.vaultValidate)},
		{http.MethodPost, pathVaultToken, true, s.onVaultConnection(s.vaultToken)},
		{http.MethodGet, pathVaultAuthorize, true, s.vaultAuthorize},
		{http.MethodPost, pathVaultSessions, true, s.vaultCreateSession},
		{http.MethodPost, pathVaultConsumers, false, s.vaultCreateConsumer},
		{http.MethodGet, pathVaultConsumers, false, s.vaultListConsumers},
		{http.MethodGet, pathVaultConsumer, false, s.vaultGetConsumer},
		{http.MethodPatch, pathVaultConsumer, false, s.vaultUpdateConsumer},
		{http.MethodDelete, pathVaultConsumer, false, s.vaultDeleteConsumer},
	}
}

// VaultRoutes lists the "METHOD /path" patterns of /vault.
func VaultRoutes() []string {
	var out []string
	for _, r := range (&server{}).vaultRoutes() {
		out = append(out, r.method+" "+r.path)
	}
	return out
}

// mountVault adds /vault to mux when the store supports it.
func (s *server) mountVault(mux *http.ServeMux) {
	vs, ok := s.cfg.Store.(VaultStore)
	if !ok {
		return
	}
	s.vault = vs
	allowed := map[string][]string{}
	var paths []string
	for _, rt := range s.vaultRoutes() {
		mux.Handle(rt.method+" "+rt.path, s.instrument(rt.path, s.sessionGuard(rt, s.vaultGuard(rt.consumer, rt.h))))
		if _, ok := allowed[rt.path]; !ok {
			paths = append(paths, rt.path)
		}
		allowed[rt.path] = append(allowed[rt.path], rt.method)
	}
	for _, p := range paths {
		methods := allowed[p]
		if slices.Contains(methods, http.MethodGet) {
			methods = append(methods, http.MethodHead)
		}
		allow := strings.Join(methods, ", ")
		mux.Handle(p, s.instrument(p, s.vaultGuard(false, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Allow", allow)
			writeVaultError(w, http.StatusMethodNotAllowed, typeMethodNotAllowed, "method not allowed; allowed: "+allow, codeMethodNotAllowed)
		})))
	}
	mux.Handle("/vault/", s.instrument("unmatched", s.vaultGuard(false, func(w http.ResponseWriter, _ *http.Request) {
		writeVaultError(w, http.StatusNotFound, typeEntityNotFound, "no such route", codeNotFound)
	})))
}

// vaultGuard checks the bearer token and Apideck's headers: the app id
// always, the consumer id when consumer is true.
func (s *server) vaultGuard(consumer bool, next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if msg := s.checkToken(w, r); msg != "" {
			writeVaultError(w, http.StatusUnauthorized, typeUnauthorized, msg, codeUnauthorized)
			return
		}
		if strings.TrimSpace(r.Header.Get(headerAppID)) == "" {
			writeVaultError(w, http.StatusBadRequest, typeRequestHeadersValidation,
				"missing header "+headerAppID, codeInvalidHeader)
			return
		}
		if consumer {
			id := r.Header.Get(headerConsumerID)
			if id == "" {
				writeVaultError(w, http.StatusBadRequest, typeRequestHeadersValidation,
					"missing header "+headerConsumerID, codeInvalidHeader)
				return
			}
			if !tasks.ValidConsumerID(id) {
				writeVaultError(w, http.StatusBadRequest, typeRequestHeadersValidation,
					headerConsumerID+" must be 1 to 128 letters, digits or . _ : @ -, starting with a letter or digit", codeInvalidHeader)
				return
			}
		}
		next(w, r)
	})
}

// vaultTarget reads the connection a /vault route names: the consumer from
// the header, the integration from the path.
func (s *server) vaultTarget(r *http.Request) (target, error) {
	return s.pathTarget(r, r.Header.Get(headerConsumerID))
}

// onVaultConnection adapts a Vault handler of one connection (see
// resolved).
func (s *server) onVaultConnection(h func(http.ResponseWriter, *http.Request, target)) http.HandlerFunc {
	return resolved(s.vaultTarget, s.vaultFail, h)
}

func (s *server) vaultListConnections(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	api := q.Get("api")
	if api != "" && !idRE.MatchString(api) {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidQuery, "api must be a unified API id such as crm"))
		return
	}
	var configured *bool
	if v := q.Get("configured"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidQuery, "configured must be true or false"))
			return
		}
		configured = &b
	}
	cid := r.Header.Get(headerConsumerID)
	now := s.cfg.NowFunc()
	out := make([]vaultConnection, 0, len(s.cfg.Catalog.Integrations))
	err := s.eachConnection(r.Context(), cid, func(in *catalog.Integration, c *state.Connection) {
		var unifiedAPI string
		if in != nil {
			unifiedAPI = in.UnifiedAPI
		} else { // its integration left the catalog
			unifiedAPI = c.UnifiedAPI
		}
		if (api == "" || unifiedAPI == api) && (configured == nil || *configured == (c != nil)) && sessionAllowsAPI(r, unifiedAPI) {
			out = append(out, s.vaultViewLinks(vaultView(c, in, now), c))
		}
	})
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	writeVault(w, http.StatusOK, out)
}

// vaultGetConnection answers 200 with state "available" for a connection
// the consumer has not added, as Apideck does.
func (s *server) vaultGetConnection(w http.ResponseWriter, r *http.Request, t target) {
	c, err := s.cfg.Store.Get(r.Context(), t.ref)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		s.vaultFail(w, r, err)
		return
	}
	s.writeVaultConnection(w, t, c)
}

func (s *server) writeVaultConnection(w http.ResponseWriter, t target, c *state.Connection) {
	if c != nil {
		w.Header().Set("ETag", etag(c.Version))
	}
	writeVault(w, http.StatusOK, s.vaultViewLinks(vaultView(c, t.in, s.cfg.NowFunc()), c))
}

// vaultUpdateBody is the part of Apideck's ConnectionInput vaultfleet
// uses; every other field (configuration, custom_mappings, read-only
// fields of the connection) is ignored.
type vaultUpdateBody struct {
	Enabled  *bool                      `json:"enabled"`
	Settings map[string]json.RawMessage `json:"settings"`
	Metadata json.RawMessage            `json:"metadata"`
}

// vaultUpdateConnection adds the connection when the consumer has not yet
// (Apideck: updating an available connection adds it) and otherwise
// patches it.
func (s *server) vaultUpdateConnection(w http.ResponseWriter, r *http.Request, t target) {
	ifVersion, body, err := writeRequest[vaultUpdateBody](w, r, s.decodeLenient)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	in, err := splitSettings(t.in, body.Settings)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	in.Enabled, in.Metadata = body.Enabled, body.Metadata
	s.vaultSave(w, r, t, in, ifVersion)
}

// vaultSave is the write of PATCH and import: it checks the input, patches
// or creates the connection (under ifVersion when not 0), notifies the
// change, records the consumer and answers the connection.
func (s *server) vaultSave(w http.ResponseWriter, r *http.Request, t target, in state.Input, ifVersion int64) {
	if err := checkInput(t.in, writeBody{Credentials: in.Credentials, Settings: in.Settings}); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	ch, err := s.patchOrCreate(r.Context(), t.ref, in, ifVersion)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	s.notify(r, ch)
	s.ensureConsumer(r, t.ref.ConsumerID)
	s.writeVaultConnection(w, t, ch.After)
}

// patchOrCreate patches an existing connection or creates it; a create
// that loses a race to another create patches instead.
func (s *server) patchOrCreate(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error) {
	for range 3 {
		ch, err := s.cfg.Store.Patch(ctx, ref, in, ifVersion)
		if !errors.Is(err, state.ErrNotFound) || ifVersion > 0 {
			if errors.Is(err, state.ErrNotFound) {
				err = state.ErrVersionConflict
			}
			return ch, err
		}
		ch, err = s.vault.Create(ctx, ref, in)
		if !errors.Is(err, state.ErrExists) {
			return ch, err
		}
	}
	return state.Change{}, state.ErrContention
}

// ensureConsumer gives the consumer of a /vault write a record, so that it
// shows in GET /vault/consumers. A failure is logged: the write is done.
func (s *server) ensureConsumer(r *http.Request, id string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.cfg.NotifyTimeout)
	defer cancel()
	if _, err := s.vault.EnsureConsumer(ctx, id); err != nil {
		s.log.WarnContext(ctx, "api: recording the consumer failed", "error", err.Error())
	}
}

// splitSettings splits Apideck's settings object: values of the
// integration's credential fields become credentials, the rest settings.
// Values may be strings, numbers or booleans; null clears. Messages never
// quote a value.
func splitSettings(in *catalog.Integration, raw map[string]json.RawMessage) (state.Input, error) {
	var out state.Input
	for _, k := range sortedKeys(raw) {
		v, err := settingValue(raw[k])
		if err != nil {
			return out, errf(http.StatusBadRequest, codeInvalidField, "settings."+safeName(k)+": "+err.Error())
		}
		// An OAuth connection's tokens are cleared (disconnect) with null;
		// they are written by the connect flow or import only.
		clearToken := v == "" && in.AuthType == catalog.AuthOAuth2 &&
			(k == catalog.FieldAccessToken || k == catalog.FieldRefreshToken || k == catalog.FieldExpiresAt)
		if slices.Contains(in.CredentialFields, k) || clearToken {
			if out.Credentials == nil {
				out.Credentials = map[string]string{}
			}
			out.Credentials[k] = v
			continue
		}
		if out.Settings == nil {
			out.Settings = map[string]string{}
		}
		out.Settings[k] = v
	}
	if c := out.Credentials; in.AuthType == catalog.AuthOAuth2 && c != nil {
		at, atSet := c[catalog.FieldAccessToken]
		rt, rtSet := c[catalog.FieldRefreshToken]
		if atSet && rtSet && at == "" && rt == "" {
			c[catalog.FieldExpiresAt] = "" // disconnected: no expiry of nothing
		}
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func settingValue(raw json.RawMessage) (string, error) {
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", errors.New("not a JSON value")
	}
	switch x := v.(type) {
	case nil:
		return "", nil
	case string:
		return x, nil
	case bool:
		return strconv.FormatBool(x), nil
	case float64:
		return strings.TrimSpace(string(raw)), nil
	}
	return "", errors.New("want a string, number, boolean or null")
}

// decodeLenient reads a JSON object body like decode, but ignores unknown
// fields (Apideck clients send read-only fields back).
func (s *server) decodeLenient(w http.ResponseWriter, r *http.Request, dst any) error {
	if !isJSON(r.Header.Get("Content-Type")) {
		return errf(http.StatusUnsupportedMediaType, codeUnsupportedMedia, "the body must be JSON (Content-Type: application/json)")
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(dst); err != nil {
		return s.decodeError(err)
	}
	if dec.More() {
		return errf(http.StatusBadRequest, codeInvalidJSON, "the body must hold exactly one JSON object")
	}
	return nil
}

func (s *server) vaultDeleteConnection(w http.ResponseWriter, r *http.Request, t target) {
	if err := s.deleteTarget(r, t); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// vaultImportBody is Apideck's ConnectionImportData.
type vaultImportBody struct {
	Credentials *struct {
		AccessToken  string  `json:"access_token"`
		RefreshToken *string `json:"refresh_token"`
		IssuedAt     *string `json:"issued_at"`
		ExpiresIn    *int64  `json:"expires_in"`
	} `json:"credentials"`
	Settings map[string]json.RawMessage `json:"settings"`
	Metadata json.RawMessage            `json:"metadata"`
}

// vaultImport writes the tokens of an OAuth connection authorized
// elsewhere. A token without issued_at and expires_in has an unknown age:
// it is stored as expired, so that the write enqueues a refresh at once.
func (s *server) vaultImport(w http.ResponseWriter, r *http.Request, t target) {
	if t.in.AuthType != catalog.AuthOAuth2 {
		s.vaultFail(w, r, errf(http.StatusUnprocessableEntity, codeNotOAuth,
			t.in.ID+" authenticates with "+string(t.in.AuthType)+": import takes OAuth tokens; use PATCH with settings"))
		return
	}
	var body vaultImportBody
	if err := s.decodeLenient(w, r, &body); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	if body.Credentials == nil || body.Credentials.AccessToken == "" {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "credentials.access_token: required"))
		return
	}
	in, err := splitSettings(t.in, body.Settings)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	now := s.cfg.NowFunc().UTC()
	cr := body.Credentials
	// The import replaces the tokens: a refresh token of an earlier
	// authorization does not survive an import without one.
	creds := map[string]string{catalog.FieldAccessToken: cr.AccessToken, catalog.FieldRefreshToken: ""}
	if cr.RefreshToken != nil {
		creds[catalog.FieldRefreshToken] = *cr.RefreshToken
	}
	issued := now
	if cr.IssuedAt != nil && *cr.IssuedAt != "" {
		if issued, err = parseTime(*cr.IssuedAt); err != nil {
			s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "credentials.issued_at: want an RFC 3339 time"))
			return
		}
	}
	switch {
	case cr.ExpiresIn != nil && *cr.ExpiresIn <= 0:
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "credentials.expires_in: want a positive number of seconds"))
		return
	case cr.ExpiresIn != nil:
		creds[catalog.FieldExpiresAt] = issued.Add(secondsDuration(*cr.ExpiresIn)).UTC().Format(timeRFC3339)
	case cr.IssuedAt != nil && *cr.IssuedAt != "":
		creds[catalog.FieldExpiresAt] = issued.Add(t.in.TokenLifetimeOrDefault()).UTC().Format(timeRFC3339)
	default:
		// Age unknown: expired now, so that it is refreshed at once.
		creds[catalog.FieldExpiresAt] = now.Format(timeRFC3339)
	}
	for k, v := range in.Credentials {
		creds[k] = v
	}
	in.Credentials, in.Metadata = creds, body.Metadata
	s.vaultSave(w, r, t, in, 0)
}

type vaultValidateData struct {
	ID    string      `json:"id"`
	State state.State `json:"state"`
}

// vaultValidate enqueues a validation as POST /v1/.../validate does and
// answers at once with the connection's current state.
func (s *server) vaultValidate(w http.ResponseWriter, r *http.Request, t target) {
	_, c, err := s.enqueueFor(r, t, tasks.TypeValidate)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	st, _ := state.Derive(c, t.in, s.cfg.NowFunc())
	writeVault(w, http.StatusOK, vaultValidateData{ID: c.ID, State: st})
}
