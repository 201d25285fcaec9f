package connect

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// maxChoicesBody caps a choices answer (1 MiB).
const maxChoicesBody = 1 << 20

// ErrNoChoices means the setting lists no choices in the catalog, or the
// connection has no access token to list them with.
var ErrNoChoices = errors.New("connect: no choices for this setting")

// Choice is one value a consumer may pick for a setting.
type Choice struct {
	Value string `json:"value"`
	Label string `json:"label"`
}

func (f *Flow) client(in *catalog.Integration) *http.Client {
	return &http.Client{Transport: f.cfg.Transport, CheckRedirect: in.CheckRedirect, Timeout: f.cfg.Timeout}
}

// Revoke revokes c's grant at the provider (RFC 7009: the refresh token,
// else the access token) when the catalog has a revoke_url. revoked is
// false when there is nothing to call. Errors carry no token.
func (f *Flow) Revoke(ctx context.Context, c *state.Connection) (revoked bool, err error) {
	in, ok := f.cfg.Catalog.Get(c.ServiceID)
	if !ok || in.OAuth == nil {
		return false, nil
	}
	u, ok, err := in.RevokeURL(c.Settings)
	if !ok || err != nil {
		return false, err
	}
	tok, hint := c.Credentials.RefreshToken, "refresh_token"
	if tok == "" {
		tok, hint = c.Credentials.AccessToken, "access_token"
	}
	if tok == "" {
		return false, nil
	}
	id, secret := f.cfg.Getenv(in.OAuth.ClientIDEnv), f.cfg.Getenv(in.OAuth.ClientSecretEnv)
	form := url.Values{"token": {tok}, "token_type_hint": {hint}}
	if in.OAuth.AuthStyle == catalog.AuthStyleParams {
		form.Set("client_id", id)
		form.Set("client_secret", secret)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), strings.NewReader(form.Encode()))
	if err != nil {
		return false, fmt.Errorf("connect: revoke: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if in.OAuth.AuthStyle != catalog.AuthStyleParams {
		req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	}
	resp, err := f.client(in).Do(req)
	if err != nil {
		return false, fmt.Errorf("connect: revoke at %s: %w", u.Host, errors.Unwrap(err))
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return false, fmt.Errorf("connect: revoke at %s: HTTP %d", u.Host, resp.StatusCode)
	}
	return true, nil
}

// Choices lists the values the provider offers for setting name (Xero's
// tenants), fetched with c's access token.
func (f *Flow) Choices(ctx context.Context, c *state.Connection, name string) ([]Choice, error) {
	in, ok := f.cfg.Catalog.Get(c.ServiceID)
	if !ok {
		return nil, ErrNoChoices
	}
	u, ch, ok, err := in.ChoicesURL(name, c.Settings)
	if !ok || c.Credentials.AccessToken == "" {
		return nil, ErrNoChoices
	}
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("connect: choices: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.Credentials.AccessToken)
	req.Header.Set("Accept", "application/json")
	resp, err := f.client(in).Do(req)
	if err != nil {
		return nil, fmt.Errorf("connect: choices at %s: %w", u.Host, errors.Unwrap(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("connect: choices at %s: HTTP %d", u.Host, resp.StatusCode)
	}
	var items []map[string]any
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxChoicesBody)).Decode(&items); err != nil {
		return nil, fmt.Errorf("connect: choices at %s: not a JSON array", u.Host)
	}
	out := make([]Choice, 0, len(items))
	for _, it := range items {
		v, _ := it[ch.Value].(string)
		if v == "" {
			continue
		}
		l, _ := it[ch.Label].(string)
		if l == "" {
			l = v
		}
		out = append(out, Choice{Value: v, Label: l})
	}
	return out, nil
}
