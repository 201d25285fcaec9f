package catalog

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"time"
)

// ErrHostNotAllowed means a URL (built from settings, or a redirect) points
// at a scheme, host or port the integration does not allow.
var ErrHostNotAllowed = errors.New("catalog: host not allowed")

// ErrUnknownIntegration means no integration has the given id (or, from
// Catalog.Lookup, it belongs to another unified API).
var ErrUnknownIntegration = errors.New("catalog: unknown integration")

// ErrMissingSetting means a URL template needs a setting that is empty.
var ErrMissingSetting = errors.New("catalog: missing setting")

// ErrInvalidSetting means a setting value breaks the rules of its type
// (unknown name, not a URL, not one path segment, not a DNS label, ...).
// Every ValidateSettings error wraps it, and so do CheckURL, TokenURL and
// CheckHeaders errors caused by a stored value; where a host rule is the
// reason the error wraps ErrHostNotAllowed too.
var ErrInvalidSetting = errors.New("catalog: invalid setting")

// Default returns the catalog embedded in the binary.
// Each call parses the embedded file afresh, so callers may change what
// they get without affecting each other.
func Default() (*Catalog, error) { return Parse(defaultYAML) }

// Load reads and validates a catalog file.
func Load(path string) (*Catalog, error) { return load(path) }

// Parse reads and validates a catalog from YAML. Errors name the
// integration and the field.
func Parse(data []byte) (*Catalog, error) { return parse(data) }

// Get returns the integration with the given service id.
func (c *Catalog) Get(id string) (*Integration, bool) { return c.get(id) }

// Interval returns the periodic check interval for a connection in the
// given state ("callable", "invalid", "added"); defaults apply. Any other
// state (authorized, ...) gets the "added" interval.
func (in *Integration) Interval(state string) time.Duration {
	if state != IntervalCallable && state != IntervalInvalid {
		state = IntervalAdded
	}
	if d := in.Intervals[state]; d > 0 {
		return d.D()
	}
	return defaultInterval(state)
}

// RefreshWindowFor returns how long before expiry a token with the given
// lifetime is refreshed: the catalog's window (at most half the lifetime),
// or min(10m, 20% of lifetime). Every margin scales with the lifetime, so a
// short-lived token is not due the moment it is issued.
func (in *Integration) RefreshWindowFor(lifetime time.Duration) time.Duration {
	if in.RefreshWindow > 0 {
		if lifetime > 0 {
			return min(in.RefreshWindow.D(), lifetime/2)
		}
		return in.RefreshWindow.D()
	}
	if lifetime <= 0 {
		return DefaultRefreshWindow
	}
	return min(DefaultRefreshWindow, lifetime/refreshWindowLifeShare)
}

// CheckURL builds the check URL from the settings and refuses any scheme,
// host or port the integration does not allow.
func (in *Integration) CheckURL(settings map[string]string) (*url.URL, error) {
	return in.buildURL("check.url", in.Check.URL, settings)
}

// CheckHeaders returns the catalog's extra check headers with templates
// filled from settings.
func (in *Integration) CheckHeaders(settings map[string]string) (http.Header, error) {
	h := make(http.Header, len(in.Check.Headers))
	for name, t := range in.Check.Headers {
		segs, err := in.compileHeader(t)
		if err == nil {
			t, err = in.fill(segs, settings)
		}
		if err != nil {
			return nil, fmt.Errorf("catalog: integration %q: check.headers.%s: %w", in.ID, name, err)
		}
		h.Set(name, t)
	}
	return h, nil
}

// TokenURL builds the OAuth token URL from the settings, with the same host
// rules as CheckURL.
func (in *Integration) TokenURL(settings map[string]string) (*url.URL, error) {
	if in.OAuth == nil || in.OAuth.TokenURL == "" {
		return nil, fmt.Errorf("catalog: integration %q: no oauth token_url", in.ID)
	}
	return in.buildURL("oauth.token_url", in.OAuth.TokenURL, settings)
}

// AuthorizeURL builds the OAuth authorization endpoint from the settings
// (without the query the connect flow adds), with the host rules of
// CheckURL. ok is false when the integration has no authorize_url.
func (in *Integration) AuthorizeURL(settings map[string]string) (u *url.URL, ok bool, err error) {
	if in.OAuth == nil || in.OAuth.AuthorizeURL == "" {
		return nil, false, nil
	}
	u, err = in.buildURL("oauth.authorize_url", in.OAuth.AuthorizeURL, settings)
	return u, true, err
}

// RevokeURL builds the revocation endpoint; ok is false when there is none.
func (in *Integration) RevokeURL(settings map[string]string) (u *url.URL, ok bool, err error) {
	if in.OAuth == nil || in.OAuth.RevokeURL == "" {
		return nil, false, nil
	}
	u, err = in.buildURL("oauth.revoke_url", in.OAuth.RevokeURL, settings)
	return u, true, err
}

// ChoicesURL builds the URL listing the values of setting name; ok is
// false when the setting has no choices.
func (in *Integration) ChoicesURL(name string, settings map[string]string) (u *url.URL, c *Choices, ok bool, err error) {
	for _, s := range in.Settings {
		if s.Name == name && s.Choices != nil {
			u, err = in.buildURL("settings."+name+".choices.url", s.Choices.URL, settings)
			return u, s.Choices, true, err
		}
	}
	return nil, nil, false, nil
}

// MissingScopes returns the required scopes not among granted, in catalog
// order; nil when all are granted or none is required.
func (in *Integration) MissingScopes(granted []string) []string {
	if in.OAuth == nil {
		return nil
	}
	var out []string
	for _, s := range in.OAuth.RequiredScopes {
		if !slices.Contains(granted, s) {
			out = append(out, s)
		}
	}
	return out
}

// AllowURL checks one URL (e.g. a redirect target) against the host rules.
// Errors wrap ErrHostNotAllowed and name the host.
//
// The rules: scheme https (http too with allow_http); no userinfo; a
// non-empty host without trailing dot, percent-encoding or backslash,
// compared in lower case; IP literals (and forms resolvers read as IPs:
// 2130706433, 0x7f000001, 0177.0.0.1, 127.1) and localhost only when an
// allowed_hosts entry lists exactly that literal; an entry without a port
// allows only the scheme's default port.
func (in *Integration) AllowURL(u *url.URL) error {
	if err := in.allow(u); err != nil {
		return fmt.Errorf("catalog: integration %q: %w", in.ID, err)
	}
	return nil
}

// ValidateSettings checks settings a consumer supplies: known names only,
// URL settings parse and point at allowed hosts, path settings are single
// segments. Errors wrap ErrHostNotAllowed where that is the reason.
//
// url settings must be absolute URLs with an empty or "/" path and no
// query or fragment, whose scheme and host pass AllowURL; host settings
// must pass AllowURL as https://value; text settings must be one segment
// (at most 256 bytes, not "." or "..", no control characters, '/', '\' or
// '%'), and a DNS label when a template puts them in a host. Empty values
// are allowed: they mean unset. Every error wraps ErrInvalidSetting.
func (in *Integration) ValidateSettings(settings map[string]string) error {
	names := make([]string, 0, len(settings))
	for k := range settings {
		names = append(names, k)
	}
	sort.Strings(names)
	var errs []error
	for _, name := range names {
		if err := in.validateSetting(name, settings[name]); err != nil {
			errs = append(errs, fmt.Errorf("catalog: integration %q: %w", in.ID, &settingError{name: name, err: err}))
		}
	}
	return errors.Join(errs...)
}

func (in *Integration) validateSetting(name, v string) error {
	typ, ok := in.settingType(name)
	if !ok {
		return errors.New("unknown setting")
	}
	if v == "" {
		return nil
	}
	var err error
	switch typ {
	case SettingURL:
		_, err = in.urlValue(v)
	case SettingHost:
		_, err = in.hostValue(v)
	default:
		// A DNS label is stricter than a path segment: it alone decides
		// for a setting that a template puts in a host.
		if _, inHost := in.placeholderUse(name, false); inHost {
			_, err = labelValue(v)
		} else {
			err = textValue(v)
		}
	}
	return err
}

// IsInvalidStatus reports whether an HTTP status of the check endpoint
// means the credentials were rejected.
func (in *Integration) IsInvalidStatus(code int) bool {
	if len(in.Check.InvalidStatuses) == 0 {
		return slices.Contains(defaultInvalidStatuses(), code)
	}
	return slices.Contains(in.Check.InvalidStatuses, code)
}

// SettingAffectsCheck reports whether changing the named setting bumps the
// credentials revision.
// It is true when the setting is declared affects_check or used in the
// check URL, the check headers or the token URL; false for unknown names.
func (in *Integration) SettingAffectsCheck(name string) bool {
	for _, s := range in.Settings {
		if s.Name == name {
			used, _ := in.placeholderUse(name, true)
			return s.AffectsCheck || used
		}
	}
	return false
}

// TokenLifetimeOrDefault is TokenLifetime, or DefaultTokenLifetime for an
// integration built without New's defaults.
func (in *Integration) TokenLifetimeOrDefault() time.Duration {
	if d := in.TokenLifetime.D(); d > 0 {
		return d
	}
	return DefaultTokenLifetime
}

// ConfirmSpacingOrDefault is ConfirmSpacing, or DefaultConfirmSpacing for
// an integration built without New's defaults.
func (in *Integration) ConfirmSpacingOrDefault() time.Duration {
	if d := in.ConfirmSpacing.D(); d > 0 {
		return d
	}
	return DefaultConfirmSpacing
}

// Checkable reports whether the integration's connections are checked and
// refreshed (status live or beta).
func (in *Integration) Checkable() bool { return in.Status.Checkable() }
