package catalog

import (
	"errors"
	"net/http"
	"net/url"
	"time"
)

// ErrHostNotAllowed means a URL (built from settings, or a redirect) points
// at a scheme, host or port the integration does not allow.
var ErrHostNotAllowed = errors.New("catalog: host not allowed")

// ErrUnknownIntegration means no integration has the given id.
var ErrUnknownIntegration = errors.New("catalog: unknown integration")

// ErrMissingSetting means a URL template needs a setting that is empty.
var ErrMissingSetting = errors.New("catalog: missing setting")

// Default returns the catalog embedded in the binary.
func Default() (*Catalog, error) { panic("unimplemented") }

// Load reads and validates a catalog file.
func Load(path string) (*Catalog, error) { panic("unimplemented") }

// Parse reads and validates a catalog from YAML. Errors name the
// integration and the field.
func Parse(data []byte) (*Catalog, error) { panic("unimplemented") }

// Get returns the integration with the given service id.
func (c *Catalog) Get(id string) (*Integration, bool) { panic("unimplemented") }

// Interval returns the periodic check interval for a connection in the
// given state ("callable", "invalid", "added"); defaults apply.
func (in *Integration) Interval(state string) time.Duration { panic("unimplemented") }

// RefreshWindowFor returns how long before expiry a token with the given
// lifetime is refreshed: the catalog's window, or min(10m, 20% of lifetime).
func (in *Integration) RefreshWindowFor(lifetime time.Duration) time.Duration {
	panic("unimplemented")
}

// CheckURL builds the check URL from the settings and refuses any scheme,
// host or port the integration does not allow.
func (in *Integration) CheckURL(settings map[string]string) (*url.URL, error) {
	panic("unimplemented")
}

// CheckHeaders returns the catalog's extra check headers with templates
// filled from settings.
func (in *Integration) CheckHeaders(settings map[string]string) (http.Header, error) {
	panic("unimplemented")
}

// TokenURL builds the OAuth token URL from the settings, with the same host
// rules as CheckURL.
func (in *Integration) TokenURL(settings map[string]string) (*url.URL, error) {
	panic("unimplemented")
}

// AllowURL checks one URL (e.g. a redirect target) against the host rules.
func (in *Integration) AllowURL(u *url.URL) error { panic("unimplemented") }

// ValidateSettings checks settings a consumer supplies: known names only,
// URL settings parse and point at allowed hosts, path settings are single
// segments. Errors wrap ErrHostNotAllowed where that is the reason.
func (in *Integration) ValidateSettings(settings map[string]string) error { panic("unimplemented") }

// IsInvalidStatus reports whether an HTTP status of the check endpoint
// means the credentials were rejected.
func (in *Integration) IsInvalidStatus(code int) bool { panic("unimplemented") }

// SettingAffectsCheck reports whether changing the named setting bumps the
// credentials revision.
func (in *Integration) SettingAffectsCheck(name string) bool { panic("unimplemented") }

// Checkable reports whether the integration's connections are checked and
// refreshed (status live or beta).
func (in *Integration) Checkable() bool { return in.Status.Checkable() }
