package api

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

const (
	codeGrantNotSupported = "grant_not_supported"
	codeTokenRefused      = "token_refused"
	codeTokenUnavailable  = "token_endpoint_unavailable"
)

// vaultToken runs the client-credentials grant for a connection of an
// integration the catalog marks oauth.grant_type: client_credentials, with
// the connection's client_id/client_secret credential fields (or the
// integration's own client when the catalog declares no such fields), and
// stores the token like a refresh does. Other integrations get 422. The
// answer is the connection; the token itself is never echoed.
func (s *server) vaultToken(w http.ResponseWriter, r *http.Request, t target) {
	if t.in.GrantType() != catalog.GrantClientCredentials {
		grant := t.in.GrantType()
		if grant == "" {
			grant = string(t.in.AuthType) + " (no OAuth grant)"
		}
		s.vaultFail(w, r, errf(http.StatusUnprocessableEntity, codeGrantNotSupported,
			t.in.ID+" uses "+grant+": only client_credentials integrations get a token on demand"))
		return
	}
	c, err := s.cfg.Store.Get(r.Context(), t.ref)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	switch {
	case !c.Enabled:
		s.vaultFail(w, r, errf(http.StatusUnprocessableEntity, codeConnectionDisabled, "the connection is disabled; enable it first"))
		return
	case !t.in.Checkable():
		s.vaultFail(w, r, errf(http.StatusUnprocessableEntity, codeIntegrationInactive,
			"connector status "+string(t.in.Status)+" is not checked or refreshed (only live and beta are)"))
		return
	}
	cfg, err := s.clientCredentials(t.in, c)
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	now := s.cfg.NowFunc().UTC()
	ctx, cancel := context.WithTimeout(r.Context(), DefaultTokenTimeout)
	defer cancel()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, s.cfg.TokenHTTPClient)
	tok, err := cfg.Token(ctx)
	if err != nil {
		s.vaultFail(w, r, tokenError(err))
		return
	}
	nt := state.Tokens{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, IssuedAt: now}
	if tok.ExpiresIn > 0 {
		nt.ExpiresAt = now.Add(time.Duration(tok.ExpiresIn) * time.Second)
	} else if !tok.Expiry.IsZero() {
		nt.ExpiresAt = tok.Expiry
	}
	ch, err := s.vault.StoreTokens(context.WithoutCancel(r.Context()), t.ref, c.Credentials.RefreshToken, nt)
	if errors.Is(err, state.ErrStale) {
		err = errf(http.StatusConflict, codeVersionConflict, "the connection's credentials changed meanwhile; try again")
	}
	if err != nil {
		s.vaultFail(w, r, err)
		return
	}
	s.notify(r, ch)
	s.writeVaultConnection(w, t, ch.After)
}

// clientCredentials builds the grant for connection c of integration in.
func (s *server) clientCredentials(in *catalog.Integration, c *state.Connection) (*clientcredentials.Config, error) {
	u, err := in.TokenURL(c.Settings)
	if err != nil {
		return nil, errf(http.StatusUnprocessableEntity, codeHostNotAllowed, "the token URL cannot be built from the connection's settings")
	}
	id, secret, fromEnv := in.ClientFor(c.Credentials.Get, s.cfg.Getenv)
	if fromEnv {
		if id == "" {
			s.log.Error("api: client-credentials grant impossible: client id missing",
				slog.String("integration", in.ID), slog.String("client_id_env", in.OAuth.ClientIDEnv))
			return nil, errf(http.StatusUnprocessableEntity, codeIncomplete, "the integration's client is not configured")
		}
	}
	if id == "" {
		return nil, errf(http.StatusUnprocessableEntity, codeIncomplete, "the connection has no client_id; set it in settings first")
	}
	style := oauth2.AuthStyleInHeader
	if in.OAuth.AuthStyle == catalog.AuthStyleParams {
		style = oauth2.AuthStyleInParams
	}
	return &clientcredentials.Config{ClientID: id, ClientSecret: secret, TokenURL: u.String(),
		Scopes: in.OAuth.Scopes, AuthStyle: style}, nil
}

// tokenError maps a token endpoint failure: a refusal (4xx other than 429)
// is the connection's invalid state, anything else the provider's trouble.
// The provider's body is not echoed (it may quote the secret).
func tokenError(err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) && re.Response != nil {
		sc := re.Response.StatusCode
		if sc >= 400 && sc < 500 && sc != http.StatusTooManyRequests {
			msg := "the token endpoint refused the client credentials"
			if re.ErrorCode != "" && safeNameRE.MatchString(re.ErrorCode) {
				msg += " (" + re.ErrorCode + ")"
			}
			return errf(http.StatusUnprocessableEntity, codeTokenRefused, msg)
		}
		return errf(http.StatusBadGateway, codeTokenUnavailable, "the token endpoint answered HTTP "+http.StatusText(sc))
	}
	return errf(http.StatusBadGateway, codeTokenUnavailable, "the token endpoint could not be reached")
}
