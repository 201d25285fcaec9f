package catalog

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
)

// Defaults applied after validation.
const (
	DefaultMethod         = "GET"
	DefaultCheckTimeout   = 10 * time.Second
	DefaultCallableEvery  = time.Hour
	DefaultInvalidEvery   = 6 * time.Hour
	DefaultAddedEvery     = time.Hour
	DefaultConfirmSpacing = time.Minute
	// DefaultInvalidWaveWindow is the invalid-wave guard's window.
	DefaultInvalidWaveWindow = 10 * time.Minute
	DefaultTokenLifetime     = 2 * time.Hour
	DefaultRefreshWindow     = 10 * time.Minute
	DefaultAPIKeyHeader      = "X-API-Key"
	literalPrefix            = "literal:"
	minInvalidStatus         = 400
	maxInvalidStatus         = 599
	refreshWindowLifeShare   = 5 // 20% of the lifetime
)

// defaultInvalidStatuses returns the check statuses that mean "invalid"
// unless the catalog lists others.
func defaultInvalidStatuses() []int { return []int{401, 403} }

// Interval states (keys of Integration.Intervals).
const (
	IntervalCallable = "callable"
	IntervalInvalid  = "invalid"
	IntervalAdded    = "added"
)

// Check auth schemes (CheckAuth.Scheme).
const (
	AuthSchemeBearer = "bearer"
	AuthSchemeHeader = "header"
	AuthSchemeQuery  = "query"
	AuthSchemeBasic  = "basic"
)

// OAuth auth styles (OAuth.AuthStyle).
const (
	AuthStyleHeader = "header"
	AuthStyleParams = "params"
)

var (
	idRE       = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)
	snakeRE    = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	envRE      = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`)
	headerRE   = regexp.MustCompile("^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
	methods    = []string{"GET", "HEAD", "POST"}
	authTypes  = []AuthType{AuthOAuth2, AuthAPIKey, AuthBasic}
	statuses   = []Status{StatusLive, StatusBeta, StatusEarlyAccess, StatusDevelopment, StatusConsidering}
	setTypes   = []string{SettingURL, SettingHost, SettingText}
	schemes    = []string{AuthSchemeBearer, AuthSchemeHeader, AuthSchemeQuery, AuthSchemeBasic}
	authStyles = []string{AuthStyleHeader, AuthStyleParams}
	intervalOf = []string{IntervalCallable, IntervalInvalid, IntervalAdded}
)

// problems collects validation errors of one integration.
type problems struct {
	who  string
	errs []error
}

func (p *problems) add(field, format string, args ...any) {
	p.errs = append(p.errs, fmt.Errorf("catalog: %s: %s: %s", p.who, field, fmt.Sprintf(format, args...)))
}

// validate checks one integration (the i-th of the file).
func (in *Integration) validate(i int) error {
	p := &problems{who: fmt.Sprintf("integration #%d", i+1)}
	if in.ID != "" {
		p.who = fmt.Sprintf("integration %q", in.ID)
	}
	switch {
	case in.ID == "":
		p.add("id", "required")
	case !idRE.MatchString(in.ID):
		p.add("id", "%q must be a lower-case id matching %s", in.ID, idRE)
	}
	if strings.TrimSpace(in.Name) == "" {
		p.add("name", "required")
	}
	switch {
	case in.UnifiedAPI == "":
		p.add("unified_api", "required")
	case !idRE.MatchString(in.UnifiedAPI):
		p.add("unified_api", "%q must be a lower-case id such as crm or hris", in.UnifiedAPI)
	}
	if !slices.Contains(authTypes, in.AuthType) {
		p.add("auth_type", "%q is not one of oauth2, api_key, basic", in.AuthType)
	}
	if !slices.Contains(statuses, in.Status) {
		p.add("status", "%q is not one of live, beta, early-access, development, considering", in.Status)
	}
	in.validateFields(p)
	in.validateSettings(p)
	in.validateHosts(p)
	if in.BaseURL != "" {
		in.validateBaseURL(p)
	}
	in.validateCheck(p)
	in.validateOAuth(p)
	in.validateTimes(p)
	return errors.Join(p.errs...)
}

func (in *Integration) validateFields(p *problems) {
	if (in.AuthType == AuthAPIKey || in.AuthType == AuthBasic) && len(in.CredentialFields) == 0 {
		p.add("credential_fields", "required for auth_type %s", in.AuthType)
	}
	for i, f := range in.CredentialFields {
		field := fmt.Sprintf("credential_fields[%d]", i)
		if !snakeRE.MatchString(f) {
			p.add(field, "%q must be snake_case", f)
		}
		if slices.Index(in.CredentialFields, f) != i {
			p.add(field, "duplicate field %q", f)
		}
	}
}

func (in *Integration) validateSettings(p *problems) {
	for i, s := range in.Settings {
		field := fmt.Sprintf("settings[%d]", i)
		switch {
		case !snakeRE.MatchString(s.Name):
			p.add(field+".name", "%q must be snake_case", s.Name)
		case s.Name == placeholderBaseURL:
			p.add(field+".name", "%q is reserved for the base_url placeholder", s.Name)
		case slices.IndexFunc(in.Settings, func(o Setting) bool { return o.Name == s.Name }) != i:
			p.add(field+".name", "duplicate setting %q", s.Name)
		}
		if s.Type != "" && !slices.Contains(setTypes, s.Type) {
			p.add(field+".type", "setting %q: %q is not one of url, host, text", s.Name, s.Type)
		}
		if s.FromToken != "" && in.AuthType != AuthOAuth2 {
			p.add(field+".from_token", "only for auth_type oauth2")
		}
		if c := s.Choices; c != nil {
			if in.AuthType != AuthOAuth2 {
				p.add(field+".choices", "only for auth_type oauth2 (listed with the access token)")
			}
			in.validateTemplate(p, field+".choices.url", c.URL)
			if c.Value == "" {
				p.add(field+".choices.value", "required: the field holding each choice's value")
			}
		}
	}
}

func (in *Integration) validateHosts(p *problems) {
	if len(in.AllowedHosts) == 0 {
		p.add("allowed_hosts", "required: list the hosts check and token URLs may reach")
	}
	for i, h := range in.AllowedHosts {
		if _, err := parseEntry(h); err != nil {
			p.add(fmt.Sprintf("allowed_hosts[%d]", i), "%v", err)
		}
	}
}

func (in *Integration) validateBaseURL(p *problems) {
	u, err := url.Parse(in.BaseURL)
	switch {
	case err != nil:
		p.add("base_url", "%v", err)
	case !u.IsAbs() || u.Host == "":
		p.add("base_url", "%q is not an absolute URL", in.BaseURL)
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		p.add("base_url", "%q must not have a query or fragment", in.BaseURL)
	case strings.ContainsAny(authority(in.BaseURL), "@\\%"):
		p.add("base_url", "%q: userinfo, backslash or percent-encoding in host", in.BaseURL)
	default:
		if err := in.allow(u); err != nil {
			p.add("base_url", "%v", err)
		}
	}
}

// validateTemplate checks a URL template and that its literal host (with
// sample values for placeholders in the host) is allowed.
func (in *Integration) validateTemplate(p *problems, field, t string) {
	if t == "" {
		p.add(field, "required")
		return
	}
	segs, err := in.compileURL(t)
	if err != nil {
		p.add(field, "%v", err)
		return
	}
	if segs[0].name != "" {
		return // the origin is a url setting or base_url, checked on use
	}
	var b strings.Builder
	for _, s := range segs {
		switch {
		case s.name == "":
			b.WriteString(s.lit)
		case s.where == inHost:
			if typ, _ := in.settingType(s.name); typ == SettingHost {
				return // the whole host comes from a setting, checked on use
			}
			b.WriteString("a")
		default:
			b.WriteString("a")
		}
	}
	u, err := url.Parse(b.String())
	if err != nil {
		p.add(field, "%v", errors.Unwrap(err))
		return
	}
	if u.Scheme == "" || u.Host == "" {
		p.add(field, "%q is not an absolute URL", t)
		return
	}
	if err := in.allow(u); err != nil {
		p.add(field, "%v", err)
	}
}

func (in *Integration) validateCheck(p *problems) {
	c := &in.Check
	in.validateTemplate(p, "check.url", c.URL)
	if c.Method != "" && !slices.Contains(methods, c.Method) {
		p.add("check.method", "%q is not one of %s", c.Method, strings.Join(methods, ", "))
	}
	names := make([]string, 0, len(c.Headers))
	for k := range c.Headers {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		field := "check.headers." + k
		if !headerRE.MatchString(k) {
			p.add(field, "%q is not a valid header name", k)
		}
		if hasControl(c.Headers[k]) {
			p.add(field, "control character in header value")
		}
		if _, err := in.compileHeader(c.Headers[k]); err != nil {
			p.add(field, "%v", err)
		}
	}
	for i, s := range c.InvalidStatuses {
		if s < minInvalidStatus || s > maxInvalidStatus {
			p.add(fmt.Sprintf("check.invalid_statuses[%d]", i), "%d is not in %d..%d", s, minInvalidStatus, maxInvalidStatus)
		}
	}
	if c.Assert != nil {
		if c.Assert.Path == "" {
			p.add("check.assert.path", "required")
		} else if slices.Contains(strings.Split(c.Assert.Path, "."), "") {
			p.add("check.assert.path", "%q has an empty part", c.Assert.Path)
		}
	}
	if c.Timeout < 0 {
		p.add("check.timeout", "must not be negative")
	}
	in.validateAuth(p)
}

// effectiveAuth is the check auth with the defaults of the auth type.
func (in *Integration) effectiveAuth() CheckAuth {
	a := in.Check.Auth
	if a.Scheme == "" {
		switch in.AuthType {
		case AuthOAuth2:
			a.Scheme = AuthSchemeBearer
		case AuthAPIKey:
			a.Scheme = AuthSchemeHeader
			if a.Name == "" {
				a.Name = DefaultAPIKeyHeader
			}
		case AuthBasic:
			a.Scheme = AuthSchemeBasic
		}
	}
	switch a.Scheme {
	case AuthSchemeBearer, AuthSchemeHeader, AuthSchemeQuery:
		if a.Field == "" {
			switch in.AuthType {
			case AuthOAuth2:
				a.Field = FieldAccessToken
			case AuthAPIKey:
				a.Field = FieldAPIKey
			}
		}
	case AuthSchemeBasic:
		if a.Username == "" && a.Password == "" && in.AuthType == AuthBasic {
			a.Username, a.Password = FieldUsername, FieldPassword
		}
	}
	return a
}

func (in *Integration) validateAuth(p *problems) {
	a := in.effectiveAuth()
	known := func(f string) bool {
		return slices.Contains(in.CredentialFields, f) ||
			in.AuthType == AuthOAuth2 && f == FieldAccessToken
	}
	if !slices.Contains(schemes, a.Scheme) {
		if a.Scheme != "" {
			p.add("check.auth.scheme", "%q is not one of %s", a.Scheme, strings.Join(schemes, ", "))
		}
		return
	}
	switch a.Scheme {
	case AuthSchemeHeader, AuthSchemeQuery:
		if a.Name == "" {
			p.add("check.auth.name", "required for scheme %s", a.Scheme)
		} else if a.Scheme == AuthSchemeHeader && !headerRE.MatchString(a.Name) {
			p.add("check.auth.name", "%q is not a valid header name", a.Name)
		}
		fallthrough
	case AuthSchemeBearer:
		switch {
		case a.Field == "":
			p.add("check.auth.field", "required for scheme %s", a.Scheme)
		case !known(a.Field):
			p.add("check.auth.field", "%q is not a credential field", a.Field)
		}
	case AuthSchemeBasic:
		if a.Username == "" {
			p.add("check.auth.username", "required for scheme basic")
		}
		for _, f := range [][2]string{{"username", a.Username}, {"password", a.Password}} {
			if f[1] != "" && !strings.HasPrefix(f[1], literalPrefix) && !known(f[1]) {
				p.add("check.auth."+f[0], "%q is not a credential field (or literal:value)", f[1])
			}
		}
	}
}

func (in *Integration) validateOAuth(p *problems) {
	o := in.OAuth
	switch {
	case in.AuthType == AuthOAuth2 && o == nil:
		p.add("oauth", "required for auth_type oauth2 (token_url, client_id_env, ...)")
		return
	case in.AuthType != AuthOAuth2 && o != nil:
		p.add("oauth", "only for auth_type oauth2, not %q", in.AuthType)
		return
	case o == nil:
		return
	}
	in.validateTemplate(p, "oauth.token_url", o.TokenURL)
	for _, e := range [][2]string{{"client_id_env", o.ClientIDEnv}, {"client_secret_env", o.ClientSecretEnv}} {
		if e[1] != "" && !envRE.MatchString(e[1]) {
			p.add("oauth."+e[0], "%q does not look like an environment variable name", e[1])
		}
	}
	if o.GrantType != "" && o.GrantType != GrantAuthorizationCode && o.GrantType != GrantClientCredentials {
		p.add("oauth.grant_type", "%q is not one of %s, %s", o.GrantType, GrantAuthorizationCode, GrantClientCredentials)
	}
	if o.AuthStyle != "" && !slices.Contains(authStyles, o.AuthStyle) {
		p.add("oauth.auth_style", "%q is not one of header, params", o.AuthStyle)
	}
	for i, s := range o.Scopes {
		if strings.TrimSpace(s) == "" || strings.ContainsAny(s, " \t\r\n") {
			p.add(fmt.Sprintf("oauth.scopes[%d]", i), "%q is not a scope", s)
		}
	}
	if o.AuthorizeURL != "" {
		in.validateTemplate(p, "oauth.authorize_url", o.AuthorizeURL)
	}
	if o.RevokeURL != "" {
		in.validateTemplate(p, "oauth.revoke_url", o.RevokeURL)
	}
	if o.PKCE && o.AuthorizeURL == "" {
		p.add("oauth.pkce", "needs oauth.authorize_url")
	}
	for k := range o.AuthorizeParams {
		switch k {
		case "response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method":
			p.add("oauth.authorize_params."+k, "set by the connect flow, not the catalog")
		}
	}
	for i, s := range o.RequiredScopes {
		if !slices.Contains(o.Scopes, s) {
			p.add(fmt.Sprintf("oauth.required_scopes[%d]", i), "%q is not one of oauth.scopes", s)
		}
	}
}

func (in *Integration) validateTimes(p *problems) {
	keys := make([]string, 0, len(in.Intervals))
	for k := range in.Intervals {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch {
		case !slices.Contains(intervalOf, k):
			p.add("intervals."+k, "unknown state %q: want callable, invalid or added", k)
		case in.Intervals[k] <= 0:
			p.add("intervals."+k, "must be positive")
		}
	}
	if in.RefreshWindow < 0 {
		p.add("refresh_window", "must not be negative")
	}
	r := in.RateLimit
	switch {
	case r.Requests < 0:
		p.add("rate_limit.requests", "must not be negative")
	case r.Per < 0:
		p.add("rate_limit.per", "must not be negative")
	case r.Per > 0 && r.Requests == 0:
		p.add("rate_limit.requests", "must be positive when per is set")
	case r.Requests > 0 && r.Per == 0:
		p.add("rate_limit.per", "must be positive when requests is set")
	}
	if in.ConfirmInvalid < 0 {
		p.add("confirm_invalid", "must not be negative")
	}
	if w := in.InvalidWave; w != nil {
		if w.Threshold < 1 {
			p.add("invalid_wave.threshold", "must be at least 1")
		}
		if w.Window < 0 {
			p.add("invalid_wave.window", "must not be negative")
		}
	}
	if in.ConfirmSpacing < 0 {
		p.add("confirm_spacing", "must not be negative")
	}
	if in.TokenLifetime < 0 {
		p.add("token_lifetime", "must not be negative")
	}
}

// applyDefaults fills in what validation allows to be left out.
func (in *Integration) applyDefaults() {
	if in.Check.Method == "" {
		in.Check.Method = DefaultMethod
	}
	if len(in.Check.InvalidStatuses) == 0 {
		in.Check.InvalidStatuses = defaultInvalidStatuses()
	}
	if in.Check.Timeout == 0 {
		in.Check.Timeout = Duration(DefaultCheckTimeout)
	}
	in.Check.Auth = in.effectiveAuth()
	for i := range in.Settings {
		if in.Settings[i].Type == "" {
			in.Settings[i].Type = SettingText
		}
	}
	if in.Intervals == nil {
		in.Intervals = make(map[string]Duration, len(intervalOf))
	}
	for _, k := range intervalOf {
		if in.Intervals[k] == 0 {
			in.Intervals[k] = Duration(defaultInterval(k))
		}
	}
	if in.InvalidWave != nil && in.InvalidWave.Window == 0 {
		in.InvalidWave.Window = Duration(DefaultInvalidWaveWindow)
	}
	if in.ConfirmSpacing == 0 {
		in.ConfirmSpacing = Duration(DefaultConfirmSpacing)
	}
	if in.TokenLifetime == 0 {
		in.TokenLifetime = Duration(DefaultTokenLifetime)
	}
	if in.OAuth != nil && in.OAuth.AuthStyle == "" {
		in.OAuth.AuthStyle = AuthStyleHeader
	}
}

func defaultInterval(state string) time.Duration {
	switch state {
	case IntervalCallable:
		return DefaultCallableEvery
	case IntervalInvalid:
		return DefaultInvalidEvery
	default:
		return DefaultAddedEvery
	}
}
