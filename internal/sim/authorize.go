package sim

import (
	"crypto/sha256"
	"encoding/base64"
	"html/template"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// DemoPassword is the password the simulated login pages accept (any user
// name). A wrong one shows the login again with an error.
const DemoPassword = "demo"

// EndpointAuthorize counts the authorization endpoint (login and consent).
const EndpointAuthorize = "authorize"

// codeTTL is how long an authorization code may wait for its exchange.
const codeTTL = time.Minute

// authCode is an authorization code awaiting its exchange.
type authCode struct {
	fam         *family
	clientID    string
	redirectURI string
	challenge   string // S256 code challenge, "" without PKCE
	expiresAt   time.Time
}

// authorizePath is where each provider's authorization endpoint lives.
func authorizePath(id string) string {
	if id == Salesforce {
		return "/services/oauth2/authorize"
	}
	return "/identity/connect/authorize"
}

var consentPage = template.Must(template.New("consent").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{.Provider}}: sign in</title></head>
<body>
<h1>{{.Provider}} (simulated)</h1>
<p>An application asks to access your {{.Provider}} account.</p>
{{if .Error}}<p id="error" role="alert">{{.Error}}</p>{{end}}
<form method="post" action="{{.Action}}">
{{range $k, $v := .Params}}<input type="hidden" name="{{$k}}" value="{{$v}}">{{end}}
<label>User <input id="username" name="username" autocomplete="username"></label>
<label>Password <input id="password" type="password" name="password" autocomplete="current-password"></label>
<fieldset><legend>Permissions requested</legend>
{{range .Scopes}}<label><input type="checkbox" name="grant_scope" value="{{.}}" checked> {{.}}</label>
{{end}}</fieldset>
<button id="allow" name="decision" value="allow">Allow</button>
<button id="deny" name="decision" value="deny">Deny</button>
</form>
</body></html>
`))

// authorize serves the authorization endpoint: GET shows login and
// consent, POST decides. Errors about client_id or redirect_uri are shown
// here (RFC 6749 4.1.2.1: never redirect to an unverified URI); the others
// go back to the redirect URI.
func (o *oauthProvider) authorize(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, "malformed request", http.StatusBadRequest)
		return
	}
	q := r.Form
	redirect, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || !redirect.IsAbs() || (redirect.Scheme != "http" && redirect.Scheme != "https") {
		http.Error(w, "invalid redirect_uri", http.StatusBadRequest)
		return
	}
	if !equal(q.Get("client_id"), o.clientID) {
		http.Error(w, "unknown client_id", http.StatusBadRequest)
		return
	}
	back := func(params url.Values) {
		params.Set("state", q.Get("state"))
		u := *redirect
		u.RawQuery = params.Encode()
		http.Redirect(w, r, u.String(), http.StatusFound)
	}
	if q.Get("response_type") != "code" {
		back(url.Values{"error": {"unsupported_response_type"}})
		return
	}
	if m := q.Get("code_challenge_method"); q.Get("code_challenge") != "" && m != "S256" {
		back(url.Values{"error": {"invalid_request"}, "error_description": {"only S256"}})
		return
	}
	params := map[string]string{}
	for _, k := range []string{"response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method"} {
		if v := q.Get(k); v != "" {
			params[k] = v
		}
	}
	scopes := strings.Fields(q.Get("scope"))
	show := func(status int, msg string) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(status)
		_ = consentPage.Execute(w, map[string]any{"Provider": title(o.srv.id), "Action": authorizePath(o.srv.id),
			"Params": params, "Scopes": scopes, "Error": msg})
	}
	if r.Method != http.MethodPost {
		show(http.StatusOK, "")
		return
	}
	if q.Get("decision") != "allow" {
		back(url.Values{"error": {"access_denied"}, "error_description": {"the user denied access"}})
		return
	}
	if strings.TrimSpace(q.Get("username")) == "" || !equal(q.Get("password"), DemoPassword) {
		show(http.StatusUnauthorized, "Wrong user name or password.")
		return
	}
	var granted []string
	for _, s := range q["grant_scope"] {
		if slices.Contains(scopes, s) {
			granted = append(granted, s)
		}
	}
	now := o.p.now()
	f := &family{id: o.p.uuid(), account: accountName(q.Get("username")), created: now, scope: strings.Join(granted, " ")}
	o.flavor.newFamily(f)
	code := o.p.randString(32, alnum)
	o.mu.Lock()
	o.families = append(o.families, f)
	if o.codes == nil {
		o.codes = map[string]*authCode{}
	}
	o.codes[code] = &authCode{fam: f, clientID: o.clientID, redirectURI: q.Get("redirect_uri"),
		challenge: q.Get("code_challenge"), expiresAt: now.Add(codeTTL)}
	o.mu.Unlock()
	o.p.log.Info("simulated consent given", slog.String("provider", o.srv.id), slog.String("account", f.account))
	back(url.Values{"code": {code}})
}

// accountName turns a login name into an account name.
func accountName(user string) string {
	user, _, _ = strings.Cut(strings.ToLower(strings.TrimSpace(user)), "@")
	var b strings.Builder
	for _, r := range user {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		}
	}
	if b.Len() == 0 {
		return "demo"
	}
	return b.String()
}

// exchangeCode serves grant_type=authorization_code: the code is single
// use, bound to the client and redirect URI, and with PKCE the verifier
// must hash to the challenge.
func (o *oauthProvider) exchangeCode(w http.ResponseWriter, r *http.Request) {
	now := o.p.now()
	code := r.PostForm.Get("code")
	o.mu.Lock()
	c, ok := o.codes[code]
	delete(o.codes, code)
	o.mu.Unlock()
	bad := func(desc string) {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_grant", Description: desc})
	}
	switch {
	case !ok:
		bad("unknown or used authorization code")
		return
	case !now.Before(c.expiresAt):
		bad("authorization code expired")
		return
	case r.PostForm.Get("redirect_uri") != c.redirectURI:
		bad("redirect_uri mismatch")
		return
	case c.challenge != "":
		sum := sha256.Sum256([]byte(r.PostForm.Get("code_verifier")))
		if !equal(base64.RawURLEncoding.EncodeToString(sum[:]), c.challenge) {
			bad("code_verifier does not match the code_challenge")
			return
		}
	}
	o.mu.Lock()
	access, refresh, _ := o.mintLocked(c.fam, now, o.flavor.ttl)
	o.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, o.flavor.tokenBody(c.fam, access, refresh, now, o.flavor.ttl))
}

// revokeEndpoint serves RFC 7009 revocation: token=<refresh or access
// token>, client authenticated like the token endpoint. Unknown tokens are
// 200 too, as the RFC asks.
func (o *oauthProvider) revokeEndpoint(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_request"})
		return
	}
	id, secret, basic := r.BasicAuth()
	if !basic {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	if !equal(id, o.clientID) || !equal(secret, o.clientSecret) {
		writeJSON(w, http.StatusUnauthorized, oauthError{Error: "invalid_client"})
		return
	}
	_ = o.revoke(r.PostForm.Get("token"), o.p.now())
	w.WriteHeader(http.StatusOK)
}
