package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
)

// Writer is the store write Seed needs; *state.Store has it.
type Writer interface {
	Put(ctx context.Context, ref state.Ref, in state.Input, ifVersion int64) (state.Change, error)
}

var _ Writer = (*state.Store)(nil)

// Seed sizes.
const (
	// DefaultConsumers is the number of demo consumers when Seed's n is
	// zero or negative.
	DefaultConsumers = 6
	// MinConsumers is the fewest consumers whose connections show every
	// state.
	MinConsumers = 2
)

// ErrTooFewConsumers means Seed was asked for fewer than MinConsumers.
var ErrTooFewConsumers = errors.New("sim: too few demo consumers to show every state")

// UnifiedAPI returns the unified API of a provider id in the dev catalog,
// "" for an unknown id.
func UnifiedAPI(providerID string) string {
	switch providerID {
	case Salesforce, Pipedrive:
		return "crm"
	case BambooHR:
		return "hris"
	case Xero:
		return "accounting"
	}
	return ""
}

// Setting names the seed writes.
const (
	settingInstanceURL = "instance_url"
	settingSubdomain   = "subdomain"
	settingTenantID    = "tenant_id"
)

// SeededConnection is one demo connection and what it should show.
type SeededConnection struct {
	Ref        state.Ref
	ServiceID  string
	UnifiedAPI string
	// Written is false for connections that stay `available`: the
	// consumer did not add the integration, so nothing is stored.
	Written bool
	// Expect is the state the connection reaches within the first minute,
	// once its first check (if any) is done.
	Expect state.State
	// Then is the state it moves to later, "" if none: `invalid` once a
	// credential is revoked, `callable` once ChooseTenant sets a Xero
	// tenant.
	Then state.State
	// TenantID is the tenant ChooseTenant sets (Xero without a tenant).
	TenantID string
	// Story says in a few words what the connection shows.
	Story string
	// Version is the stored version after the write (0 if not written).
	Version int64
}

// demo is what one demo connection is made of.
type demo int

const (
	notAdded demo = iota
	sfValid
	sfExpiring
	sfExpired
	sfRevokedLater
	keyValid
	keyWrong
	keyRevokedLater
	keyMissing
	wrongSubdomain
	xeroNoTenant
	xeroTenant
)

// seedServices is the order of a profile's entries.
var seedServices = [4]string{Salesforce, BambooHR, Xero, Pipedrive}

// profiles are the demo consumers' connections, by consumer index (mod
// len): the first MinConsumers together show every state.
var profiles = [][4]demo{
	// acme: callable, Xero waiting for its tenant, Pipedrive not added
	// (the README's tour shows it as available).
	{sfValid, keyValid, xeroNoTenant, notAdded},
	// globex: a session refreshed at once, a wrong key, a connection
	// without its key, Xero not added.
	{sfExpiring, keyWrong, notAdded, keyMissing},
	// initech: a refresh token and an API key revoked later, Pipedrive
	// not added.
	{sfRevokedLater, keyRevokedLater, xeroTenant, notAdded},
	// umbrella: Salesforce not added, BambooHR without a key, Xero
	// waiting for its tenant.
	{notAdded, keyMissing, xeroNoTenant, keyValid},
	// hooli: an expired session, a key for another subdomain.
	{sfExpired, wrongSubdomain, xeroTenant, keyValid},
	// stark: all good.
	{sfValid, keyValid, xeroTenant, keyValid},
}

var consumerNames = []string{"acme", "globex", "initech", "umbrella", "hooli", "stark",
	"wayne", "wonka", "soylent", "tyrell", "cyberdyne", "aperture"}

// consumerName is the i-th demo consumer id.
func consumerName(i int) string {
	name := consumerNames[i%len(consumerNames)]
	if i >= len(consumerNames) {
		name = fmt.Sprintf("%s-%d", name, i/len(consumerNames)+1)
	}
	return name
}

// Seed writes the connections of n demo consumers (DefaultConsumers if n
// is zero or negative) with credentials minted by p, chosen so that every
// state shows within the first minute: callable (valid keys and tokens,
// some about to be refreshed), invalid (a wrong API key, a subdomain that
// does not exist; later a revoked API key and a revoked refresh token),
// added (an API-key connection without its key; every API-key connection
// until its first check), authorized (Xero without a tenant) and
// available (an integration a consumer did not add: nothing written).
//
// w must use p.CatalogYAML's catalog. Seed writes with Put and enqueues
// nothing: the caller enqueues a validation of each written connection
// (or waits for the store's safety net). It returns every demo
// connection, the available ones included, with the states they should
// reach; on error, the ones seeded so far.
func Seed(ctx context.Context, w Writer, p *Providers, n int) ([]SeededConnection, error) {
	if n <= 0 {
		n = DefaultConsumers
	}
	if n < MinConsumers {
		return nil, fmt.Errorf("%w: %d, need at least %d", ErrTooFewConsumers, n, MinConsumers)
	}
	var out []SeededConnection
	for i := range n {
		consumer := consumerName(i)
		for j, d := range profiles[i%len(profiles)] {
			if err := ctx.Err(); err != nil {
				return out, err
			}
			svc := seedServices[j]
			sc, in, err := p.demoConnection(consumer, svc, d)
			if err != nil {
				return out, err
			}
			if sc.Written {
				ch, err := w.Put(ctx, sc.Ref, in, 0)
				if err != nil {
					return out, fmt.Errorf("sim: seed %s: %w", sc.Ref, err)
				}
				if ch.After != nil {
					sc.Version = ch.After.Version
				}
			}
			out = append(out, sc)
		}
	}
	p.log.Info("demo connections seeded", slog.Int("consumers", n), slog.Int("connections", len(out)))
	return out, nil
}

// Refs returns the connections Seed writes for n demo consumers (n as for
// Seed), the ones it leaves available excluded, so a caller can remove what
// an earlier run seeded before seeding again.
func Refs(n int) []state.Ref {
	if n <= 0 {
		n = DefaultConsumers
	}
	var out []state.Ref
	for i := range n {
		for j, d := range profiles[i%len(profiles)] {
			if d == notAdded {
				continue
			}
			svc := seedServices[j]
			out = append(out, state.Ref{ConsumerID: consumerName(i), ConnectionID: state.ConnectionID(UnifiedAPI(svc), svc)})
		}
	}
	return out
}

// ChooseTenant sets the tenant of a Xero demo connection that sits in
// `authorized`, as the consumer would after picking an organisation. The
// caller enqueues a validation, as after any credential change.
func ChooseTenant(ctx context.Context, w Writer, sc SeededConnection) (state.Change, error) {
	if sc.TenantID == "" {
		return state.Change{}, fmt.Errorf("sim: %s has no tenant to choose", sc.Ref)
	}
	ch, err := w.Put(ctx, sc.Ref, state.Input{Settings: map[string]string{settingTenantID: sc.TenantID}}, 0)
	if err != nil {
		return ch, fmt.Errorf("sim: choose tenant of %s: %w", sc.Ref, err)
	}
	return ch, nil
}

// demoConnection mints the credentials of one demo connection.
func (p *Providers) demoConnection(consumer, svc string, d demo) (SeededConnection, state.Input, error) {
	api := UnifiedAPI(svc)
	sc := SeededConnection{
		Ref:        state.Ref{ConsumerID: consumer, ConnectionID: state.ConnectionID(api, svc)},
		ServiceID:  svc,
		UnifiedAPI: api,
		Written:    true,
	}
	t := p.t
	var in state.Input
	var err error
	switch d {
	case notAdded:
		sc.Written, sc.Expect, sc.Story = false, state.Available, "integration not added"

	case sfValid, sfExpiring, sfExpired, sfRevokedLater:
		opts := []IssueOption{Account(consumer)}
		sc.Expect = state.Callable
		switch d {
		case sfValid:
			sc.Story = "valid session, refreshed ahead of expiry"
		case sfExpiring:
			opts = append(opts, ExpiresIn(t.RefreshWindow/2))
			sc.Story = "session about to expire: refreshed at once"
		case sfExpired:
			opts = append(opts, ExpiresIn(-t.RefreshWindow))
			sc.Story = "session expired: refreshed before the first check"
		case sfRevokedLater:
			// The first refresh comes just after the revocation.
			opts = append(opts, RevokedAfter(t.RevokeAfter), ExpiresIn(t.RevokeAfter+t.RevokeAfter/8+t.RefreshWindow))
			sc.Then = state.Invalid
			sc.Story = fmt.Sprintf("refresh token revoked after %v: the next refresh gets invalid_grant", t.RevokeAfter)
		}
		var g OAuthGrant
		if g, err = p.IssueOAuth(Salesforce, opts...); err == nil {
			in = state.Input{Credentials: g.Credentials(), Settings: map[string]string{settingInstanceURL: g.InstanceURL}}
		}

	case xeroNoTenant, xeroTenant:
		var g OAuthGrant
		if g, err = p.IssueOAuth(Xero, Account(consumer)); err != nil {
			break
		}
		in = state.Input{Credentials: g.Credentials()}
		if d == xeroTenant {
			in.Settings = map[string]string{settingTenantID: g.Tenants[0].ID}
			sc.Expect, sc.Story = state.Callable, "tenant chosen; rotating refresh tokens with a grace period"
		} else {
			sc.Expect, sc.Then, sc.TenantID = state.Authorized, state.Callable, g.Tenants[0].ID
			sc.Story = "authorized, no tenant chosen yet"
		}

	case keyValid, keyWrong, keyRevokedLater, keyMissing, wrongSubdomain:
		sc.Expect = state.Callable
		var opts []IssueOption
		switch d {
		case keyValid:
			sc.Story = "valid API key"
			if svc == Pipedrive {
				sc.Story = "valid API key at a flaky provider: outages are retried, never invalidate"
			}
		case keyWrong:
			sc.Expect, sc.Story = state.Invalid, "wrong API key: 401"
		case keyRevokedLater:
			opts = append(opts, RevokedAfter(t.KeyRevokeAfter))
			sc.Then = state.Invalid
			sc.Story = fmt.Sprintf("API key revoked after %v: 401", t.KeyRevokeAfter)
		case keyMissing:
			sc.Expect, sc.Story = state.Added, "added without its API key"
		case wrongSubdomain:
			sc.Expect, sc.Story = state.Invalid, "valid API key, unknown subdomain: 404"
		}
		var k APIKey
		if k, err = p.IssueAPIKey(svc, append(opts, Account(consumer))...); err != nil {
			break
		}
		key := k.Key
		switch d {
		case keyWrong:
			key = p.WrongAPIKey()
		case keyMissing:
			key = ""
		}
		if key != "" {
			in.Credentials = map[string]string{catalog.FieldAPIKey: key}
		}
		if svc == BambooHR {
			sub := k.Subdomain
			if d == wrongSubdomain {
				sub += "-old"
			}
			in.Settings = map[string]string{settingSubdomain: sub}
		}
	}
	if err != nil {
		return sc, in, err
	}
	return sc, in, nil
}
