package events

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/vaultfleet/vaultfleet/internal/netguard"
	"github.com/vaultfleet/vaultfleet/state"
)

// EnvWebhooks names the environment variable holding the path of the
// webhook subscriptions file.
const EnvWebhooks = "VAULTFLEET_WEBHOOKS"

// MinSecretLen is the shortest signing secret accepted.
const MinSecretLen = 16

// ErrURLNotAllowed means a webhook URL breaks the host rules.
var ErrURLNotAllowed = errors.New("events: webhook URL not allowed")

// Subscription is one webhook endpoint.
type Subscription struct {
	// Name identifies the subscription in task payloads, idempotency keys
	// and logs: letters, digits, . _ -, at most 64.
	Name string `yaml:"name"`
	// URL receives the POSTs.
	URL string `yaml:"url"`
	// SecretEnv names the environment variable holding the signing secret
	// (at least MinSecretLen bytes). The file never holds the secret.
	SecretEnv string `yaml:"secret_env"`
	// Events filters by event type; empty means every event.
	Events []string `yaml:"events"`
	// AllowInsecure permits http://, localhost and loopback, private and
	// link-local addresses (development only).
	AllowInsecure bool `yaml:"allow_insecure"`
	// Format is the body and headers: FormatVaultfleet (the default) or
	// FormatApideck (Apideck Vault's payload and x-apideck-* headers, for
	// receivers written for Apideck).
	Format string `yaml:"format"`

	// Secret is the signing secret read from SecretEnv.
	Secret string `yaml:"-"`
}

// Matches reports whether the subscription wants events of type typ.
func (s *Subscription) Matches(typ string) bool {
	return len(s.Events) == 0 || slices.Contains(s.Events, typ)
}

var subscriptionNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// LoadSubscriptions reads and validates a subscriptions file; getenv
// resolves each secret_env. Errors name the file, the entry and the field,
// never a secret.
func LoadSubscriptions(path string, getenv func(string) string) ([]Subscription, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("events: webhooks file: %w", err)
	}
	subs, err := ParseSubscriptions(b, getenv)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return subs, nil
}

// LoadFromEnv loads the subscriptions file named by VAULTFLEET_WEBHOOKS;
// none (nil, nil) when the variable is unset.
func LoadFromEnv(getenv func(string) string) ([]Subscription, error) {
	path := getenv(EnvWebhooks)
	if path == "" {
		return nil, nil
	}
	subs, err := LoadSubscriptions(path, getenv)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", EnvWebhooks, err)
	}
	return subs, nil
}

// ParseSubscriptions reads a YAML list of subscriptions:
//
//	# webhooks.yaml
//	- name: billing
//	  url: https://hooks.example.com/vault
//	  secret_env: VAULTFLEET_WEBHOOK_SECRET_BILLING
//	  events: [vault.connection.invalid, vault.connection.callable]
//	  # format: apideck  # Apideck Vault's body and x-apideck-* headers
//	  # allow_insecure: true  # http, localhost, private IPs (development)
//
// and validates each entry (unique names, known event types, URL host
// rules, a secret present in the environment).
func ParseSubscriptions(data []byte, getenv func(string) string) ([]Subscription, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var subs []Subscription
	if err := dec.Decode(&subs); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("events: webhooks: %v", err)
	}
	seen := map[string]bool{}
	for i := range subs {
		s := &subs[i]
		where := fmt.Sprintf("events: webhook %d", i+1)
		if s.Name != "" {
			where = fmt.Sprintf("events: webhook %q", s.Name)
		}
		if !subscriptionNameRE.MatchString(s.Name) {
			return nil, fmt.Errorf("%s: name: want 1 to 64 letters, digits, '.', '_' or '-'", where)
		}
		if seen[s.Name] {
			return nil, fmt.Errorf("%s: name listed twice", where)
		}
		seen[s.Name] = true
		if err := CheckURL(s.URL, s.AllowInsecure); err != nil {
			return nil, fmt.Errorf("%s: url: %w", where, err)
		}
		if s.Format != "" && s.Format != FormatVaultfleet && s.Format != FormatApideck {
			return nil, fmt.Errorf("%s: format: %q is not one of %s, %s", where, s.Format, FormatVaultfleet, FormatApideck)
		}
		for _, e := range s.Events {
			if !slices.Contains(state.EventTypes(), e) {
				return nil, fmt.Errorf("%s: events: unknown event type %q (known: %s)", where, e, strings.Join(state.EventTypes(), ", "))
			}
		}
		if s.SecretEnv == "" {
			return nil, fmt.Errorf("%s: secret_env: name the environment variable that holds the signing secret", where)
		}
		s.Secret = getenv(s.SecretEnv)
		if len(s.Secret) < MinSecretLen {
			return nil, fmt.Errorf("%s: secret_env: %s is unset or shorter than %d bytes", where, s.SecretEnv, MinSecretLen)
		}
	}
	return subs, nil
}

// CheckURL checks a webhook URL against the host rules: absolute https,
// no user info, and no localhost or loopback, private, link-local,
// unspecified, multicast or otherwise non-public IP literal (netguard.Public), unless allowInsecure (development),
// which also permits http. Errors wrap ErrURLNotAllowed and never echo
// user info.
func CheckURL(raw string, allowInsecure bool) error {
	if raw == "" {
		return fmt.Errorf("%w: empty", ErrURLNotAllowed)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%w: not a URL", ErrURLNotAllowed)
	}
	if u.User != nil {
		return fmt.Errorf("%w: user info (user:password@) is not allowed; use the signing secret", ErrURLNotAllowed)
	}
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && allowInsecure:
	default:
		return fmt.Errorf("%w: scheme must be https (http only with allow_insecure)", ErrURLNotAllowed)
	}
	host := u.Hostname()
	if host == "" || u.Opaque != "" {
		return fmt.Errorf("%w: no host", ErrURLNotAllowed)
	}
	if allowInsecure {
		return nil
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return fmt.Errorf("%w: localhost needs allow_insecure", ErrURLNotAllowed)
	}
	if ip, err := netip.ParseAddr(h); err == nil {
		if !netguard.Public(ip) {
			return fmt.Errorf("%w: %s is a loopback, private, link-local or reserved address (needs allow_insecure)", ErrURLNotAllowed, ip)
		}
	} else if strings.Trim(h, "0123456789.") == "" || strings.HasPrefix(h, "0x") {
		// Numeric forms net/netip does not parse (127.1, 2130706433,
		// 0x7f.1) reach loopback through some resolvers.
		return fmt.Errorf("%w: numeric host %q is not a dotted-quad address", ErrURLNotAllowed, h)
	}
	return nil
}
