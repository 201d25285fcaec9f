package sim

import (
	"fmt"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// IssueOption adjusts a credential minted by IssueOAuth or IssueAPIKey.
type IssueOption func(*issueOptions)

type issueOptions struct {
	expiresIn   time.Duration
	hasExpiry   bool
	revokeAfter time.Duration
	revoke      bool
	account     string
}

// ExpiresIn makes the first access token of an OAuth grant expire d from
// now instead of after the provider's token lifetime; zero or negative
// issues one that has already expired. Tokens from later refreshes live the
// full lifetime. API keys ignore it.
func ExpiresIn(d time.Duration) IssueOption {
	return func(o *issueOptions) { o.expiresIn, o.hasExpiry = d, true }
}

// RevokedAfter revokes the credential d from now: an API key then gets
// 401, an OAuth grant's next refresh gets invalid_grant (its access tokens
// keep working until they expire).
func RevokedAfter(d time.Duration) IssueOption {
	return func(o *issueOptions) { o.revokeAfter, o.revoke = d, true }
}

// Account names the consumer's account at the provider: the BambooHR
// subdomain, the Salesforce org's user name domain, the Xero organisation,
// the Pipedrive company. If unset, a random one.
func Account(name string) IssueOption {
	return func(o *issueOptions) { o.account = name }
}

func applyIssue(opts []IssueOption) issueOptions {
	var o issueOptions
	for _, f := range opts {
		f(&o)
	}
	return o
}

// OAuthGrant is what an OAuth provider's authorization flow hands over.
type OAuthGrant struct {
	AccessToken  string
	RefreshToken string
	ExpiresAt    time.Time
	// InstanceURL is the Salesforce org's base URL (the instance_url
	// setting); empty for Xero.
	InstanceURL string
	// Tenants the grant reaches (Xero); empty for Salesforce.
	Tenants []Tenant
}

// Tenant is a Xero organisation a grant reaches.
type Tenant struct {
	ID   string
	Name string
}

// Credentials returns the grant as the credential fields of a connection
// (access_token, refresh_token, expires_at).
func (g OAuthGrant) Credentials() map[string]string {
	return map[string]string{
		catalog.FieldAccessToken:  g.AccessToken,
		catalog.FieldRefreshToken: g.RefreshToken,
		catalog.FieldExpiresAt:    g.ExpiresAt.UTC().Format(time.RFC3339),
	}
}

// APIKey is a key minted by an API-key provider.
type APIKey struct {
	Key string
	// Subdomain is the BambooHR company subdomain the key belongs to (the
	// subdomain setting); empty for Pipedrive.
	Subdomain string
}

// IssueOAuth mints an access and a refresh token of an OAuth provider
// (salesforce, xero), as its authorization flow would.
func (p *Providers) IssueOAuth(provider string, opts ...IssueOption) (OAuthGrant, error) {
	o := p.oauth(provider)
	if o == nil {
		return OAuthGrant{}, fmt.Errorf("%w: %q is not an OAuth provider", ErrUnknownProvider, provider)
	}
	return o.issue(applyIssue(opts), p.now()), nil
}

// IssueAPIKey mints an API key of an API-key provider (bamboohr,
// pipedrive).
func (p *Providers) IssueAPIKey(provider string, opts ...IssueOption) (APIKey, error) {
	k := p.keys(provider)
	if k == nil {
		return APIKey{}, fmt.Errorf("%w: %q is not an API-key provider", ErrUnknownProvider, provider)
	}
	return k.issue(applyIssue(opts), p.now()), nil
}

// WrongAPIKey returns a key that looks like a real one but was never
// issued: every check with it answers 401.
func (p *Providers) WrongAPIKey() string { return p.randString(40, lowHex) }
