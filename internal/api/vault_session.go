package api

// Vault sessions: POST /vault/sessions issues a session token (a signed
// JWT, package session) for one consumer; the token is accepted only on
// that consumer's /vault/connections routes (and on the Vault page, package
// vaultpage), within the session's unified_apis, and every write is checked
// against its allow_actions here, on the server.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/state"
)

// Connector is what the API uses of *connect.Flow.
type Connector interface {
	Start(ctx context.Context, req connect.Request) (*connect.Started, error)
	Revoke(ctx context.Context, c *state.Connection) (bool, error)
	Supported(unifiedAPI, serviceID string) bool
	RedirectAllowed(uri string) bool
	PageURL() string
}

var _ Connector = (*connect.Flow)(nil)

const (
	pathVaultSessions  = "/vault/sessions"
	pathVaultAuthorize = pathVaultConnection + "/authorize"

	// typeForbidden is the type_name of a refused action.
	typeForbidden = "ForbiddenError"

	codeActionNotAllowed = "action_not_allowed"
	codeSessionRoute     = "session_not_allowed_here"
	codeConsumerMismatch = "consumer_mismatch"
	codeNoConnectFlow    = "no_connect_flow"
	codeNoSessions       = "sessions_not_configured"
)

type claimsKey struct{}

// claimsOf returns the session of a request that came with a session
// token, nil for an operator.
func claimsOf(r *http.Request) *session.Claims {
	c, _ := r.Context().Value(claimsKey{}).(*session.Claims)
	return c
}

// sessionAllowsAPI: operators see every unified API.
func sessionAllowsAPI(r *http.Request, api string) bool {
	c := claimsOf(r)
	return c == nil || c.AllowsAPI(api)
}

// bearer returns the bearer token of r.
func bearer(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

// sessionToken reports whether r carries a session token (not an operator
// token) and verifies it. ok is false for operator tokens and requests
// without a JWT-shaped bearer.
func (s *server) sessionToken(r *http.Request) (c *session.Claims, err error, ok bool) {
	tok := bearer(r)
	if s.cfg.Sessions == nil || strings.Count(tok, ".") != 2 || s.cfg.Tokens.Valid(tok) {
		return nil, nil, false
	}
	c, err = s.cfg.Sessions.Verify(tok, s.cfg.NowFunc())
	return c, err, true
}

// refuseSession answers 401 when a session token comes to a route that
// takes operator tokens only (/v1), even where no token is needed at all
// (development), so that a session never works outside its routes.
func (s *server) refuseSession(w http.ResponseWriter, r *http.Request) bool {
	if _, _, ok := s.sessionToken(r); !ok {
		return false
	}
	w.Header().Set("WWW-Authenticate", `Bearer realm="vaultfleet", error="invalid_token"`)
	writeError(w, http.StatusUnauthorized, codeUnauthorized, "a session token is accepted only on /vault/connections")
	return true
}

// sessionRoute reports whether a session token may use the route.
func sessionRoute(path string) bool {
	return path == pathVaultConnections || strings.HasPrefix(path, pathVaultConnections+"/")
}

// sessionGuard lets session tokens through to the consumer's own
// /vault/connections routes, and hands every other request to operator.
func (s *server) sessionGuard(rt vaultRoute, operator http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err, ok := s.sessionToken(r)
		if !ok {
			if r.Method == http.MethodPatch && rt.path == pathVaultConnection {
				s.revokeOnDisconnect(r, r.Header.Get(headerConsumerID))
			}
			operator.ServeHTTP(w, r)
			return
		}
		switch {
		case errors.Is(err, session.ErrExpired):
			w.Header().Set("WWW-Authenticate", `Bearer realm="vaultfleet", error="invalid_token"`)
			writeVaultError(w, http.StatusUnauthorized, typeUnauthorized, "the session has expired", codeUnauthorized)
			return
		case err != nil:
			w.Header().Set("WWW-Authenticate", `Bearer realm="vaultfleet", error="invalid_token"`)
			writeVaultError(w, http.StatusUnauthorized, typeUnauthorized, "invalid session token", codeUnauthorized)
			return
		case !sessionRoute(rt.path):
			writeVaultError(w, http.StatusForbidden, typeForbidden,
				"a session token is accepted only on the consumer's own /vault/connections routes", codeSessionRoute)
			return
		}
		if id := r.Header.Get(headerConsumerID); id != "" && id != c.ConsumerID() {
			writeVaultError(w, http.StatusForbidden, typeForbidden,
				headerConsumerID+" names another consumer than the session", codeConsumerMismatch)
			return
		}
		r.Header.Set(headerConsumerID, c.ConsumerID())
		r = r.WithContext(context.WithValue(r.Context(), claimsKey{}, c))
		if api := r.PathValue("unified_api"); api != "" && !c.AllowsAPI(api) {
			writeVaultError(w, http.StatusNotFound, typeEntityNotFound, "no integration "+r.PathValue("service_id")+
				" in unified API "+api+" for this session", codeUnknownIntegration)
			return
		}
		if a, ok := s.actionOf(r, rt, c.ConsumerID()); ok {
			if err := c.Require(a); err != nil {
				writeVaultError(w, http.StatusForbidden, typeForbidden, "action "+string(a)+
					" is not allowed by this session's allow_actions", codeActionNotAllowed)
				return
			}
		}
		if r.Method == http.MethodPatch && rt.path == pathVaultConnection {
			s.revokeOnDisconnect(r, c.ConsumerID())
		}
		rt.h(w, r)
	})
}

// current reads the connection a route names, nil when absent or unreadable
// (the handler reports a read error itself).
func (s *server) current(r *http.Request, consumerID string) *state.Connection {
	api, svc := r.PathValue("unified_api"), r.PathValue("service_id")
	if api == "" || svc == "" {
		return nil
	}
	c, err := s.cfg.Store.Get(r.Context(), state.Ref{ConsumerID: consumerID, ConnectionID: state.ConnectionID(api, svc)})
	if err != nil {
		return nil
	}
	return c
}

// patchBody reads a PATCH body and puts it back for the handler.
func (s *server) patchBody(r *http.Request) (vaultUpdateBody, bool) {
	var body vaultUpdateBody
	orig := r.Body
	raw, err := io.ReadAll(io.LimitReader(orig, s.cfg.MaxBodyBytes+1))
	// The handler reads the same stream again, with its own limit (and
	// its own 413 for a body too large).
	r.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(raw), orig), orig}
	if err != nil || int64(len(raw)) > s.cfg.MaxBodyBytes || json.Unmarshal(raw, &body) != nil {
		return body, false // the handler answers the malformed body
	}
	return body, true
}

// actionOf names the allow_actions entry a request needs, if any:
// DELETE needs delete; PATCH enabled:false needs disable; PATCH clearing
// every credential it names needs disconnect; writing credentials over
// existing ones (PATCH, import) and the OAuth flow on a connection that has
// credentials need reauthorize. Adding a first connection needs none.
func (s *server) actionOf(r *http.Request, rt vaultRoute, consumerID string) (session.Action, bool) {
	switch {
	case r.Method == http.MethodDelete && rt.path == pathVaultConnection:
		return session.ActionDelete, true
	case r.Method == http.MethodPatch && rt.path == pathVaultConnection:
		body, ok := s.patchBody(r)
		if !ok {
			return "", false
		}
		if body.Enabled != nil && !*body.Enabled {
			return session.ActionDisable, true
		}
		in, ok := s.cfg.Catalog.Get(r.PathValue("service_id"))
		if !ok {
			return "", false
		}
		split, err := splitSettings(in, body.Settings)
		if err != nil || len(split.Credentials) == 0 {
			return "", false
		}
		if !slices.ContainsFunc(mapsValues(split.Credentials), func(v string) bool { return v != "" }) {
			return session.ActionDisconnect, true
		}
		if c := s.current(r, consumerID); c != nil && len(c.Credentials.Fields()) > 0 {
			return session.ActionReauthorize, true
		}
	case (r.Method == http.MethodPost && rt.path == pathVaultImport) || (r.Method == http.MethodGet && rt.path == pathVaultAuthorize):
		if c := s.current(r, consumerID); c != nil && len(c.Credentials.Fields()) > 0 {
			return session.ActionReauthorize, true
		}
	}
	return "", false
}

func mapsValues(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// revokeOnDisconnect revokes the grant at the provider before a PATCH
// clears every credential it names (best effort: a failure is logged and
// the credentials are cleared anyway).
func (s *server) revokeOnDisconnect(r *http.Request, consumerID string) {
	if s.cfg.Connect == nil || consumerID == "" {
		return
	}
	in, ok := s.cfg.Catalog.Get(r.PathValue("service_id"))
	if !ok || in.OAuth == nil || in.OAuth.RevokeURL == "" {
		return
	}
	body, ok := s.patchBody(r)
	if !ok {
		return
	}
	split, err := splitSettings(in, body.Settings)
	if err != nil || len(split.Credentials) == 0 || slices.ContainsFunc(mapsValues(split.Credentials), func(v string) bool { return v != "" }) {
		return
	}
	c := s.current(r, consumerID)
	if c == nil {
		return
	}
	if _, err := s.cfg.Connect.Revoke(r.Context(), c); err != nil {
		s.log.WarnContext(r.Context(), "api: revoking at the provider failed", "connection_id", c.ID, "error", err.Error())
	}
}

// vaultSessionBody is Apideck's Session; vaultfleet uses the fields below
// and ignores the rest (theme, custom_consumer_settings, display options).
type vaultSessionBody struct {
	ConsumerMetadata json.RawMessage `json:"consumer_metadata"`
	RedirectURI      string          `json:"redirect_uri"`
	Settings         struct {
		UnifiedAPIs   []string          `json:"unified_apis"`
		SessionLength string            `json:"session_length"`
		AllowActions  *[]session.Action `json:"allow_actions"`
	} `json:"settings"`
	Theme json.RawMessage `json:"theme"`
}

// vaultCreateSession serves POST /vault/sessions (operator tokens only).
func (s *server) vaultCreateSession(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Sessions == nil {
		s.vaultFail(w, r, errf(http.StatusNotImplemented, codeNoSessions, "sessions are not configured (set VAULTFLEET_SESSION_KEYS)"))
		return
	}
	var body vaultSessionBody
	if err := s.decodeLenient(w, r, &body); err != nil {
		s.vaultFail(w, r, err)
		return
	}
	length, err := session.ParseLength(body.Settings.SessionLength)
	if err != nil {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "settings.session_length: want 30m, 1h, 1d or 1w, at most a week"))
		return
	}
	for _, a := range body.Settings.UnifiedAPIs {
		if !idRE.MatchString(a) {
			s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "settings.unified_apis: want ids such as crm"))
			return
		}
	}
	var actions []session.Action
	if body.Settings.AllowActions != nil {
		actions = append([]session.Action{}, *body.Settings.AllowActions...)
		for _, a := range actions {
			if !slices.Contains(session.Actions(), a) {
				s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "settings.allow_actions: each one of delete, disconnect, reauthorize, disable"))
				return
			}
		}
	}
	if body.RedirectURI != "" && (s.cfg.Connect == nil || !s.cfg.Connect.RedirectAllowed(body.RedirectURI)) {
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "redirect_uri: not allowed by VAULTFLEET_REDIRECT_URIS"))
		return
	}
	consumer := r.Header.Get(headerConsumerID)
	tok, _, err := s.cfg.Sessions.Issue(session.Options{ConsumerID: consumer, UnifiedAPIs: body.Settings.UnifiedAPIs,
		AllowActions: actions, RedirectURI: body.RedirectURI, Length: length}, s.cfg.NowFunc())
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	s.ensureConsumer(r, consumer)
	// consumer_metadata (Apideck: account_name, user_name, email, image)
	// becomes the consumer record's metadata, as PATCH /vault/consumers/{id}
	// would set it.
	if m := bytes.TrimSpace(body.ConsumerMetadata); len(m) > 0 && !bytes.Equal(m, []byte("null")) {
		if _, err := s.vault.UpdateConsumer(r.Context(), consumer, m); err != nil {
			s.vaultFail(w, r, err)
			return
		}
	}
	writeVault(w, http.StatusOK, map[string]string{
		"session_uri":   strings.TrimRight(s.cfg.PublicURL, "/") + "/vault/session?token=" + tok,
		"session_token": tok,
	})
}

// vaultAuthorize serves GET .../authorize: a redirect to the provider's
// authorization endpoint (session or operator token). The outcome goes to
// the session's redirect_uri, or the ?redirect_uri= an operator names (on
// the allow-list), or the Vault page of a session without one.
func (s *server) vaultAuthorize(w http.ResponseWriter, r *http.Request) {
	t, err := s.vaultTarget(r)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	if s.cfg.Connect == nil || !s.cfg.Connect.Supported(t.in.UnifiedAPI, t.in.ID) {
		s.vaultFail(w, r, errf(http.StatusUnprocessableEntity, codeNoConnectFlow, t.in.ID+" has no OAuth connect flow (oauth.authorize_url)"))
		return
	}
	req := connect.Request{ConsumerID: t.ref.ConsumerID, UnifiedAPI: t.in.UnifiedAPI, ServiceID: t.in.ID,
		RedirectURI: r.URL.Query().Get("redirect_uri")}
	if c := claimsOf(r); c != nil {
		req.SessionID, req.SessionExpiry, req.RedirectURI = c.SessionID(), c.ExpiresAt.Time, c.RedirectURI
		if req.RedirectURI == "" {
			req.RedirectURI = s.cfg.Connect.PageURL()
		}
	}
	st, err := s.cfg.Connect.Start(r.Context(), req)
	switch {
	case errors.Is(err, connect.ErrRedirectNotAllowed):
		s.vaultFail(w, r, errf(http.StatusBadRequest, codeInvalidField, "redirect_uri: not allowed by VAULTFLEET_REDIRECT_URIS"))
		return
	case errors.Is(err, connect.ErrSessionExpired):
		s.vaultFail(w, r, errf(http.StatusUnauthorized, codeUnauthorized, "the session has expired"))
		return
	case err != nil:
		s.vaultFail(w, r, err)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	// A script holding a session token cannot follow a cross-origin
	// redirect usefully: with Accept: application/json it gets the URL.
	if strings.Contains(r.Header.Get("Accept"), "application/json") {
		writeVault(w, http.StatusOK, map[string]string{"authorize_url": st.URL})
		return
	}
	http.Redirect(w, r, st.URL, http.StatusFound)
}

// vaultView is vaultView with the connect links: authorize_url (this
// fleet's GET .../authorize) and revoke_url (the provider's revocation
// endpoint, called when the consumer disconnects).
func (s *server) vaultViewLinks(v vaultConnection, c *state.Connection) vaultConnection {
	if s.cfg.Connect != nil && s.cfg.PublicURL != "" && s.cfg.Connect.Supported(v.UnifiedAPI, v.ServiceID) {
		v.AuthorizeURL = strings.TrimRight(s.cfg.PublicURL, "/") + "/vault/connections/" + v.UnifiedAPI + "/" + v.ServiceID + "/authorize"
	}
	if in, ok := s.cfg.Catalog.Get(v.ServiceID); ok {
		var settings map[string]string
		if c != nil {
			settings = c.Settings
		}
		if u, ok, err := in.RevokeURL(settings); ok && err == nil {
			v.RevokeURL = u.String()
		}
	}
	return v
}
