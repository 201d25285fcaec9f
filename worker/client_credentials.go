package worker

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// exchangeClientCredentials gets c a new access token by running the
// client-credentials grant again (integrations with oauth.grant_type:
// client_credentials have no refresh token). It runs under the same
// refresh lock and store protocol as a refresh-token exchange, and its
// errors are classified the same way: invalid_client and
// unauthorized_client are a verdict on the connection's client, 5xx, 429
// and timeouts are transient.
func (w *Worker) exchangeClientCredentials(ctx context.Context, in *catalog.Integration, c *state.Connection) (*oauth2.Token, int, error) {
	u, err := in.TokenURL(c.Settings)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: token url: %w", errMisconfigured, err)
	}
	id, secret, fromEnv := in.ClientFor(c.Credentials.Get, w.cfg.Getenv)
	if id == "" {
		if fromEnv {
			return nil, 0, fmt.Errorf("%w: $%s is empty", errClientCredentials, in.OAuth.ClientIDEnv)
		}
		return nil, 0, fmt.Errorf("%w: the connection has no client_id", errMisconfigured)
	}
	cfg := &clientcredentials.Config{ClientID: id, ClientSecret: secret, TokenURL: u.String(),
		Scopes: in.OAuth.Scopes, AuthStyle: authStyle(in)}
	return w.tokenCall(ctx, in, cfg.Token)
}

// authStyle is how the integration's token endpoint wants the client
// credentials: in the Authorization header unless the catalog says params.
func authStyle(in *catalog.Integration) oauth2.AuthStyle {
	if in.OAuth.AuthStyle == catalog.AuthStyleParams {
		return oauth2.AuthStyleInParams
	}
	return oauth2.AuthStyleInHeader
}

// tokenCall runs one token endpoint request (fetch) through the
// integration's HTTP client, bounded by TokenTimeout and detached from
// ctx's cancellation (an exchange, once sent, is seen through). It returns
// the endpoint's HTTP status: 200, the status of a RetrieveError, or 0
// when no answer came.
func (w *Worker) tokenCall(ctx context.Context, in *catalog.Integration, fetch func(context.Context) (*oauth2.Token, error)) (*oauth2.Token, int, error) {
	hc := w.httpClient(in)
	hc.Timeout = w.cfg.TokenTimeout
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.TokenTimeout)
	defer cancel()
	ectx = context.WithValue(ectx, oauth2.HTTPClient, hc)
	tok, err := fetch(ectx)
	if err != nil {
		var re *oauth2.RetrieveError
		if errors.As(err, &re) && re.Response != nil {
			return nil, re.Response.StatusCode, err
		}
		return nil, 0, err
	}
	return tok, http.StatusOK, nil
}
