package state

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
	case "":
		return HealthOK
	}
	return h
}
