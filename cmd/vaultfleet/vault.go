package main

import (
	"context"
	"net/http"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/connect"
	"github.com/vaultfleet/vaultfleet/internal/session"
	"github.com/vaultfleet/vaultfleet/internal/vaultpage"
	"github.com/vaultfleet/vaultfleet/state"
)

// vaultSetup is the Vault page and what the /vault API needs of it.
type vaultSetup struct {
	Sessions *session.Keys
	Flow     *connect.Flow
	Page     http.Handler
}

// newVault builds the connect flow and the page. getenv reads the OAuth
// client credentials.
func newVault(ctx context.Context, a *app, n connect.Notifier, keySpec, publicURL, redirects string, getenv func(string) string) (*vaultSetup, error) {
	keys, err := session.ParseKeys(keySpec)
	if err != nil {
		return nil, err
	}
	rd, err := connect.ParseRedirects(redirects)
	if err != nil {
		return nil, err
	}
	flow, err := connect.New(connect.Config{Store: a.Store, Catalog: a.Catalog, States: state.NewFlowStates(a.Redis, ""), Notifier: n,
		Redirects: rd, PublicURL: publicURL, Getenv: getenv, Logger: a.Logger})
	if err != nil {
		return nil, err
	}
	page, err := vaultpage.New(vaultpage.Config{Store: a.Store, Catalog: a.Catalog, Sessions: keys, Flow: flow,
		Notifier: n, Secure: strings.HasPrefix(publicURL, "https://"), Done: ctx.Done(), Logger: a.Logger})
	if err != nil {
		return nil, err
	}
	return &vaultSetup{Sessions: keys, Flow: flow, Page: page}, nil
}

// mountVaultPage puts the page on its routes.
func mountVaultPage(mux *http.ServeMux, h http.Handler) {
	mux.Handle("GET "+vaultpage.SessionPath, h)
	mux.Handle(vaultpage.PagePath, h)
	mux.Handle(vaultpage.PagePath+"/", h)
	mux.Handle("GET "+connect.CallbackPath, h)
}

// demoSession issues the session dev's banner links to.
func demoSession(keys *session.Keys, base string) (string, error) {
	tok, _, err := keys.Issue(session.Options{ConsumerID: "vault-demo", Length: 24 * time.Hour}, time.Now())
	if err != nil {
		return "", err
	}
	return base + vaultpage.SessionPath + "?token=" + tok, nil
}
