package state

import "github.com/vaultfleet/vaultfleet/catalog"

// Apideck returns the health value Apideck Vault would report: the values
// both share keep their name; misconfigured (the consumer's own settings or
// credentials make a request impossible) and rotation_lost (the fleet lost
// a rotated refresh token) both ask the consumer to enter or authorize the
// connection again, which is Apideck's needs_auth. Used by /vault and by
// the apideck webhook format.
func (h Health) Apideck() Health {
	switch h {
	case HealthMisconfigured, HealthRotationLost:
		return HealthNeedsAuth
	case HealthMissingScopes:
		// Apideck's name for "the user must grant more".
		return "needs_consent"
	case "":
		return HealthOK
	}
	return h
}

// CanRefresh reports whether the fleet can get c a new access token for
// an oauth2 integration: with its refresh token, or by running the
// client-credentials grant again (oauth.grant_type: client_credentials),
// which needs none.
func CanRefresh(c Credentials, in *catalog.Integration) bool {
	return c.RefreshToken != "" || in.GrantType() == catalog.GrantClientCredentials
}
