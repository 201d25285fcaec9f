package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"mime"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/hibiken/asynq"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// idRE is the shape of a unified API or service id.
var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

type dataBody struct {
	Data any `json:"data"`
}

type listBody struct {
	Data []connectionView `json:"data"`
	Meta listMeta         `json:"meta"`
}

type listMeta struct {
	// NextCursor is null on the last page.
	NextCursor *string `json:"next_cursor"`
}

type taskView struct {
	TaskID string `json:"task_id"`
	Queue  string `json:"queue"`
	// AlreadyQueued is true when the same task was already waiting.
	AlreadyQueued bool `json:"already_queued"`
}

// writeBody is the body of PUT and PATCH.
type writeBody struct {
	Enabled     *bool             `json:"enabled"`
	Credentials map[string]string `json:"credentials"`
	Settings    map[string]string `json:"settings"`
}

// target is the connection a request names.
type target struct {
	ref state.Ref
	in  *catalog.Integration
}

// consumerID reads and checks {consumer_id}.
func consumerID(r *http.Request) (string, error) {
	id := r.PathValue("consumer_id")
	if !tasks.ValidConsumerID(id) {
		return "", errf(http.StatusBadRequest, codeInvalidID,
			"consumer_id must be 1 to 128 letters, digits or . _ : @ -, starting with a letter or digit")
	}
	return id, nil
}

// lookup finds an integration by unified API and service id.
func (s *server) lookup(unifiedAPI, serviceID string) (*catalog.Integration, bool) {
	in, ok := s.cfg.Catalog.Get(serviceID)
	if !ok || in.UnifiedAPI != unifiedAPI {
		return nil, false
	}
	return in, true
}

// target reads and checks the consumer, unified API and service of a
// connection route.
func (s *server) target(r *http.Request) (target, error) {
	cid, err := consumerID(r)
	if err != nil {
		return target{}, err
	}
	return s.pathTarget(r, cid)
}

// pathTarget checks the unified API and service a connection route's path
// names (both dialects) and returns consumer cid's connection to it.
func (s *server) pathTarget(r *http.Request, cid string) (target, error) {
	u, sid := r.PathValue("unified_api"), r.PathValue("service_id")
	if !idRE.MatchString(u) || !idRE.MatchString(sid) {
		return target{}, errf(http.StatusBadRequest, codeInvalidID,
			"unified_api and service_id must be lower-case letters, digits, _ or -")
	}
	in, ok := s.lookup(u, sid)
	if !ok {
		return target{}, errf(http.StatusNotFound, codeUnknownIntegration,
			"no integration "+sid+" in unified API "+u)
	}
	return target{ref: state.Ref{ConsumerID: cid, ConnectionID: state.ConnectionID(u, sid)}, in: in}, nil
}

func (s *server) listConsumer(w http.ResponseWriter, r *http.Request) {
	cid, err := consumerID(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	now := s.cfg.NowFunc()
	out := make([]connectionView, 0, len(s.cfg.Catalog.Integrations))
	err = s.eachConnection(r.Context(), cid, func(in *catalog.Integration, c *state.Connection) {
		out = append(out, view(cid, c, in, now))
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	writeJSON(w, http.StatusOK, dataBody{Data: out})
}

// eachConnection calls f for every integration of the catalog with the
// consumer's connection to it (nil when the consumer has not added it),
// then for each connection whose integration left the catalog (in nil: it
// is still shown). The connection lists of both dialects are built on it.
func (s *server) eachConnection(ctx context.Context, cid string, f func(in *catalog.Integration, c *state.Connection)) error {
	conns, err := s.cfg.Store.ListConsumer(ctx, cid)
	if err != nil {
		return err
	}
	stored := make(map[string]*state.Connection, len(conns))
	for _, c := range conns {
		stored[c.ID] = c
	}
	for _, in := range s.cfg.Catalog.Integrations {
		id := state.ConnectionID(in.UnifiedAPI, in.ID)
		f(in, stored[id])
		delete(stored, id)
	}
	for _, c := range stored {
		f(nil, c)
	}
	return nil
}

var listParams = []string{"state", "service_id", "unified_api", "limit", "cursor"}

func (s *server) listAll(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k, v := range q {
		if !slices.Contains(listParams, k) {
			s.fail(w, r, errf(http.StatusBadRequest, codeInvalidQuery,
				"unknown query parameter "+strconv.Quote(redact.Truncate(k, 32))+"; known: "+strings.Join(listParams, ", ")))
			return
		}
		if len(v) > 1 {
			s.fail(w, r, errf(http.StatusBadRequest, codeInvalidQuery, "query parameter "+k+" given more than once"))
			return
		}
	}
	var f state.Filter
	if v := q.Get("state"); v != "" {
		st := state.State(v)
		if !slices.Contains(state.States(), st) || st == state.Available {
			s.fail(w, r, errf(http.StatusBadRequest, codeInvalidQuery,
				"state must be one of added, authorized, invalid, callable (available connections are not stored: list a consumer's connections to see them)"))
			return
		}
		f.State = st
	}
	for _, p := range []struct {
		name string
		dst  *string
	}{{"service_id", &f.ServiceID}, {"unified_api", &f.UnifiedAPI}} {
		if v := q.Get(p.name); v != "" {
			if !idRE.MatchString(v) {
				s.fail(w, r, errf(http.StatusBadRequest, codeInvalidQuery, p.name+" must be lower-case letters, digits, _ or -"))
				return
			}
			*p.dst = v
		}
	}
	limit := DefaultListLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxListLimit {
			s.fail(w, r, errf(http.StatusBadRequest, codeInvalidQuery,
				"limit must be an integer from 1 to "+strconv.Itoa(MaxListLimit)))
			return
		}
		limit = n
	}
	conns, next, err := s.cfg.Store.List(r.Context(), f, q.Get("cursor"), limit)
	if err != nil {
		var fe *state.FieldError
		if errors.As(err, &fe) {
			err = errf(http.StatusBadRequest, codeInvalidQuery, fe.Field+": "+fe.Msg)
		}
		s.fail(w, r, err)
		return
	}
	now := s.cfg.NowFunc()
	out := listBody{Data: make([]connectionView, 0, len(conns))}
	for _, c := range conns {
		in, _ := s.lookup(c.UnifiedAPI, c.ServiceID)
		out.Data = append(out.Data, view(c.ConsumerID, c, in, now))
	}
	if next != "" {
		out.Meta.NextCursor = &next
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) getConnection(w http.ResponseWriter, r *http.Request, t target) {
	c, err := s.cfg.Store.Get(r.Context(), t.ref)
	var ue *state.UnreadableError
	if errors.As(err, &ue) && ue.Connection != nil {
		// Its credentials cannot be opened: show the non-secret facts,
		// marked, rather than fail.
		c, err = ue.Connection, nil
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.writeConnection(w, http.StatusOK, t, c)
}

func (s *server) writeConnection(w http.ResponseWriter, status int, t target, c *state.Connection) {
	if c != nil {
		w.Header().Set("ETag", etag(c.Version))
	}
	writeJSON(w, status, dataBody{Data: view(t.ref.ConsumerID, c, t.in, s.cfg.NowFunc())})
}

func etag(version int64) string { return `"` + strconv.FormatInt(version, 10) + `"` }

func (s *server) putConnection(w http.ResponseWriter, r *http.Request, t target) {
	s.write(w, r, t, false)
}

func (s *server) patchConnection(w http.ResponseWriter, r *http.Request, t target) {
	s.write(w, r, t, true)
}

// write serves PUT (patch false) and PATCH. Everything is checked before
// the store is called, and the store writes in one atomic step, so an
// error leaves nothing half-written.
func (s *server) write(w http.ResponseWriter, r *http.Request, t target, patch bool) {
	ifVersion, body, err := writeRequest[writeBody](w, r, s.decode)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if err := checkInput(t.in, body); err != nil {
		s.fail(w, r, err)
		return
	}
	in := state.Input{Enabled: body.Enabled, Credentials: body.Credentials, Settings: body.Settings}
	var ch state.Change
	if patch {
		ch, err = s.cfg.Store.Patch(r.Context(), t.ref, in, ifVersion)
	} else {
		ch, err = s.cfg.Store.Put(r.Context(), t.ref, in, ifVersion)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.notify(r, ch)
	status := http.StatusOK
	if ch.Before == nil {
		status = http.StatusCreated
		w.Header().Set("Location", r.URL.EscapedPath())
	}
	s.writeConnection(w, status, t, ch.After)
}

// writeRequest reads what a write needs besides its connection, in this
// order: the version its If-Match names, then its JSON body (decode is the
// dialect's: strict s.decode or s.decodeLenient).
func writeRequest[B any](w http.ResponseWriter, r *http.Request,
	decode func(http.ResponseWriter, *http.Request, any) error) (ifVersion int64, body B, err error) {
	if ifVersion, err = ifMatch(r); err != nil {
		return 0, body, err
	}
	if err = decode(w, r, &body); err != nil {
		return 0, body, err
	}
	return ifVersion, body, nil
}

func (s *server) deleteConnection(w http.ResponseWriter, r *http.Request, t target) {
	if err := s.deleteTarget(r, t); err != nil {
		s.fail(w, r, err)
		return
	}
	s.writeConnection(w, http.StatusOK, t, nil)
}

// onConnection adapts a native handler of one connection (see resolved).
func (s *server) onConnection(h func(http.ResponseWriter, *http.Request, target)) http.HandlerFunc {
	return resolved(s.target, s.fail, h)
}

// resolved adapts a handler of one connection: it resolves the connection
// the request addresses before h runs, and answers a bad address with
// fail. Each dialect passes its own resolve and fail (s.target and s.fail,
// s.vaultTarget and s.vaultFail), so each keeps its own error shape.
func resolved(resolve func(*http.Request) (target, error), fail func(http.ResponseWriter, *http.Request, error),
	h func(http.ResponseWriter, *http.Request, target)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		t, err := resolve(r)
		if err != nil {
			fail(w, r, err)
			return
		}
		h(w, r, t)
	}
}

// deleteTarget deletes the connection t, under the request's
// If-Match, and notifies the change: the DELETE of both dialects.
func (s *server) deleteTarget(r *http.Request, t target) error {
	ifVersion, err := ifMatch(r)
	if err != nil {
		return err
	}
	ch, err := s.cfg.Store.Delete(r.Context(), t.ref, ifVersion)
	if err != nil {
		return err
	}
	s.notify(r, ch)
	return nil
}

// notify hands a successful write to the Notifier. The write is done: a
// failure is logged, not returned (the due indexes catch a lost enqueue),
// and a client that went away does not cancel it.
func (s *server) notify(r *http.Request, ch state.Change) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.cfg.NotifyTimeout)
	defer cancel()
	if err := s.cfg.Notifier.Notify(ctx, ch); err != nil {
		c := ch.After
		if c == nil {
			c = ch.Before
		}
		attrs := []any{slog.String("error", err.Error())}
		if c != nil {
			attrs = append(attrs, slog.String("consumer_id", c.ConsumerID), slog.String("connection_id", c.ID))
		}
		s.log.WarnContext(ctx, "api: notify after write failed", attrs...)
	}
}

func (s *server) validateNow(w http.ResponseWriter, r *http.Request, t target) {
	s.enqueueNow(w, r, t, tasks.TypeValidate)
}

func (s *server) refreshNow(w http.ResponseWriter, r *http.Request, t target) {
	s.enqueueNow(w, r, t, tasks.TypeRefreshToken)
}

// enqueueNow serves POST .../validate and .../refresh: an on-demand task on
// the critical queue. A validation is deduped per connection version, a
// refresh per access token (its expiry, as the scheduler does), so that
// repeated clicks queue one task.
func (s *server) enqueueNow(w http.ResponseWriter, r *http.Request, t target, typ string) {
	out, _, err := s.enqueueFor(r, t, typ)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, dataBody{Data: out})
}

// enqueueFor checks that t's connection can take a task of type typ and
// enqueues it (deduped); it returns the task and the connection as read.
func (s *server) enqueueFor(r *http.Request, t target, typ string) (taskView, *state.Connection, error) {
	c, err := s.cfg.Store.Get(r.Context(), t.ref)
	if err != nil {
		return taskView{}, nil, err
	}
	switch {
	case typ == tasks.TypeRefreshToken && t.in.AuthType != catalog.AuthOAuth2:
		return taskView{}, c, errf(http.StatusUnprocessableEntity, codeNotOAuth,
			t.in.ID+" authenticates with "+string(t.in.AuthType)+": it has no token to refresh")
	case typ == tasks.TypeRefreshToken && c.Credentials.RefreshToken == "":
		return taskView{}, c, errf(http.StatusUnprocessableEntity, codeNoRefreshToken, "the connection has no refresh token")
	case !c.Enabled:
		return taskView{}, c, errf(http.StatusConflict, codeConnectionDisabled, "the connection is disabled; enable it first")
	case !t.in.Checkable():
		return taskView{}, c, errf(http.StatusUnprocessableEntity, codeIntegrationInactive,
			"connector status "+string(t.in.Status)+" is not checked or refreshed (only live and beta are)")
	}
	if typ == tasks.TypeValidate {
		switch st, health := state.Derive(c, t.in, s.cfg.NowFunc()); {
		case st == state.Added && health == state.HealthNeedsAuth:
			return taskView{}, c, errf(http.StatusUnprocessableEntity, codeIncomplete, "the connection has no credentials to validate")
		case health == state.HealthMissingSettings:
			return taskView{}, c, errf(http.StatusUnprocessableEntity, codeIncomplete, "a required setting is missing; set it first")
		}
	}
	spec := state.OnDemandTask(c, typ)
	task, _, err := spec.New()
	if err != nil {
		return taskView{}, c, err
	}
	out := taskView{TaskID: spec.ID(), Queue: spec.Queue()}
	info, err := s.cfg.Enqueuer.EnqueueContext(r.Context(), task)
	switch {
	case errors.Is(err, asynq.ErrTaskIDConflict):
		out.AlreadyQueued = true
	case err != nil:
		s.log.ErrorContext(r.Context(), "api: enqueue failed", slog.String("task_type", typ),
			slog.String("consumer_id", c.ConsumerID), slog.String("connection_id", c.ID), slog.String("error", err.Error()))
		e := errf(http.StatusServiceUnavailable, codeEnqueueFailed, "the task could not be enqueued; try again shortly")
		e.retryAfter = retryAfterUnavailable
		return taskView{}, c, e
	default:
		out.TaskID, out.Queue = info.ID, info.Queue
	}
	return out, c, nil
}

// ifMatch reads If-Match: a connection version, bare or quoted. Absent is 0.
func ifMatch(r *http.Request) (int64, error) {
	vals := r.Header.Values("If-Match")
	if len(vals) == 0 {
		return 0, nil
	}
	bad := errf(http.StatusBadRequest, codeInvalidIfMatch, `If-Match must be one connection version, e.g. If-Match: "3"`)
	if len(vals) > 1 {
		return 0, bad
	}
	v := strings.TrimSpace(vals[0])
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		v = v[1 : len(v)-1]
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 1 {
		return 0, bad
	}
	return n, nil
}

// decode reads a JSON object body into dst: JSON content type, at most
// MaxBodyBytes, valid UTF-8, no unknown fields, one value. Error messages never quote
// the body (it holds credentials).
func (s *server) decode(w http.ResponseWriter, r *http.Request, dst any) error {
	if !isJSON(r.Header.Get("Content-Type")) {
		return errf(http.StatusUnsupportedMediaType, codeUnsupportedMedia, "the body must be JSON (Content-Type: application/json)")
	}
	r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return s.decodeError(err)
	}
	if !utf8.Valid(raw) {
		// encoding/json would replace the bytes with U+FFFD silently, and
		// a credential would be stored other than it was sent.
		return errf(http.StatusBadRequest, codeInvalidJSON, "the body is not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return s.decodeError(err)
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return s.decodeError(err)
		}
		return errf(http.StatusBadRequest, codeInvalidJSON, "the body must hold exactly one JSON object")
	}
	return nil
}

func (s *server) decodeError(err error) error {
	var mbe *http.MaxBytesError
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &mbe):
		return errf(http.StatusRequestEntityTooLarge, codePayloadTooLarge,
			"the body is larger than "+strconv.FormatInt(mbe.Limit, 10)+" bytes")
	case errors.Is(err, io.EOF):
		return errf(http.StatusBadRequest, codeInvalidJSON, "the body is empty; send a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errf(http.StatusBadRequest, codeInvalidJSON, "the body ends in the middle of a JSON value")
	case errors.As(err, &se):
		return errf(http.StatusBadRequest, codeInvalidJSON, "malformed JSON at offset "+strconv.FormatInt(se.Offset, 10))
	case errors.As(err, &te):
		field := te.Field
		if field == "" {
			return errf(http.StatusBadRequest, codeInvalidJSON, "the body must be a JSON object")
		}
		parts := strings.Split(field, ".")
		for i := range parts {
			parts[i] = safeName(parts[i])
		}
		return errf(http.StatusBadRequest, codeInvalidField, strings.Join(parts, ".")+": wrong type (want "+jsonType(te.Type.Kind().String())+")")
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		name, _ := strconv.Unquote(strings.TrimPrefix(err.Error(), "json: unknown field "))
		return errf(http.StatusBadRequest, codeInvalidField,
			"unknown field "+strconv.Quote(safeName(name))+"; known: enabled, credentials, settings")
	}
	return errf(http.StatusBadRequest, codeInvalidJSON, "the body is not valid JSON")
}

func jsonType(kind string) string {
	switch kind {
	case "bool":
		return "boolean"
	case "map", "struct":
		return "object"
	case "string":
		return "string"
	}
	return kind
}

// isJSON accepts application/json and any application/*+json type.
func isJSON(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	return mt == "application/json" || (strings.HasPrefix(mt, "application/") && strings.HasSuffix(mt, "+json"))
}

// checkInput checks credential field names and settings before the store
// sees them (which checks again in its atomic write). Messages name the
// field when it looks like a field name, never a value.
func checkInput(in *catalog.Integration, b writeBody) error {
	allowed := credentialFields(in)
	for _, k := range slices.Sorted(maps.Keys(b.Credentials)) {
		if !slices.Contains(allowed, k) {
			return errf(http.StatusBadRequest, codeInvalidField, "credentials."+safeName(k)+": not a credential field of "+
				in.ID+" (known: "+strings.Join(allowed, ", ")+")")
		}
	}
	for _, k := range slices.Sorted(maps.Keys(b.Settings)) {
		i := slices.IndexFunc(in.Settings, func(st catalog.Setting) bool { return st.Name == k })
		if i < 0 {
			known := "it has none"
			if len(in.Settings) > 0 {
				known = "known: " + strings.Join(settingNames(in), ", ")
			}
			return errf(http.StatusBadRequest, codeInvalidSetting, "settings."+safeName(k)+": not a setting of "+in.ID+" ("+known+")")
		}
		if b.Settings[k] == "" {
			continue // clears the setting
		}
		if err := in.ValidateSettings(map[string]string{k: b.Settings[k]}); err != nil {
			if errors.Is(err, catalog.ErrHostNotAllowed) {
				return errf(http.StatusUnprocessableEntity, codeHostNotAllowed,
					"settings."+k+": points at a scheme, host or port "+in.ID+" does not allow")
			}
			return errf(http.StatusBadRequest, codeInvalidSetting, "settings."+k+": "+settingHint(in.Settings[i].Type))
		}
	}
	return nil
}

// settingHint says what a setting of a type must look like, without
// echoing the value (a consumer may have pasted a secret into it).
func settingHint(typ string) string {
	switch typ {
	case catalog.SettingURL:
		return "want an https://host URL of a host the integration allows, without path, query or user info"
	case catalog.SettingHost:
		return "want a plain host name the integration allows"
	}
	return "want a single path segment or host label without '/', spaces or control characters"
}

func settingNames(in *catalog.Integration) []string {
	out := make([]string, 0, len(in.Settings))
	for _, st := range in.Settings {
		out = append(out, st.Name)
	}
	return out
}

var safeNameRE = regexp.MustCompile(`^[a-z0-9_]{1,64}$`)

// safeName echoes a caller's field name only when it looks like one (a
// short snake_case name), not like a value pasted in the wrong place.
func safeName(k string) string {
	if safeNameRE.MatchString(k) {
		return k
	}
	return "(name withheld)"
}

// credentialFields lists the credential fields a consumer may set.
func credentialFields(in *catalog.Integration) []string {
	out := slices.Clone(in.CredentialFields)
	if in.AuthType == catalog.AuthOAuth2 {
		for _, f := range []string{catalog.FieldAccessToken, catalog.FieldRefreshToken, catalog.FieldExpiresAt} {
			if !slices.Contains(out, f) {
				out = append(out, f)
			}
		}
	}
	sort.Strings(out)
	return out
}
