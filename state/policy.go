package state

import (
	"math/rand/v2"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
)

// checkEligible reports whether a connection belongs in due:check.
func checkEligible(c *Connection, in *catalog.Integration) bool {
	if c == nil || in == nil || !c.Enabled || !in.Checkable() {
		return false
	}
	switch c.State {
	case Available, Authorized:
		return false
	case Added:
		return hasCredentials(c, in)
	}
	return true
}

// refreshEligible reports whether a connection belongs in due:refresh.
func refreshEligible(c *Connection, in *catalog.Integration) bool {
	return c != nil && in != nil && c.Enabled && in.Checkable() && in.AuthType == catalog.AuthOAuth2 &&
		CanRefresh(c.Credentials, in) && !c.Credentials.ExpiresAt.IsZero() && c.Health != HealthRevoked &&
		c.Health != HealthRotationLost
}

// Due modes of the write script.
const (
	dueRemove = "d"
	dueSet    = "s"
	dueIfNone = "n"
)

// dueCheck decides the due:check entry of a written connection.
func (s *Store) dueCheck(cur, next *Connection, in *catalog.Integration, h hints, now time.Time) (string, time.Time) {
	if !checkEligible(next, in) {
		return dueRemove, time.Time{}
	}
	switch {
	case cur == nil, !cur.Enabled, cur.Revision != next.Revision, !checkEligible(cur, in):
		// New, enabled again, new credentials, or checkable again: the
		// caller enqueues a validation now; this is the safety net.
		return dueSet, now.Add(safetyNet)
	case h.confirm:
		return dueSet, now.Add(in.ConfirmSpacingOrDefault())
	case h.verdict && cur.State != next.State:
		return dueSet, now.Add(jittered(in.Interval(string(next.State))))
	}
	return dueIfNone, now.Add(jittered(in.Interval(string(next.State))))
}

// dueRefresh decides the due:refresh entry of a written connection. The
// score is only rewritten when the expiry changed or the connection just
// became eligible, so a scheduler's lease survives unrelated writes.
func (s *Store) dueRefresh(cur, next *Connection, in *catalog.Integration) (string, time.Time) {
	if !refreshEligible(next, in) {
		return dueRemove, time.Time{}
	}
	at := RefreshAt(next.Credentials, in)
	if !refreshEligible(cur, in) || !cur.Credentials.ExpiresAt.Equal(next.Credentials.ExpiresAt) {
		return dueSet, at
	}
	return dueIfNone, at
}

// TokenLifetime is the lifetime of c's access token: ExpiresAt - IssuedAt
// when both are known, else the catalog's TokenLifetime.
func TokenLifetime(c Credentials, in *catalog.Integration) time.Duration {
	if !c.IssuedAt.IsZero() && c.ExpiresAt.After(c.IssuedAt) {
		return c.ExpiresAt.Sub(c.IssuedAt)
	}
	return in.TokenLifetimeOrDefault()
}

// RefreshAt is when a token is due for refresh ahead of expiry: ExpiresAt
// minus the integration's refresh window for the token's lifetime. It is
// the one answer to "when is this token refreshed": the due index, the
// worker and the scheduler all use it.
func RefreshAt(c Credentials, in *catalog.Integration) time.Time {
	return c.ExpiresAt.Add(-in.RefreshWindowFor(TokenLifetime(c, in)))
}

// RefreshDue reports whether c's access token should be refreshed at now:
// it can be refreshed (a refresh token, or the client-credentials grant)
// and its access token is missing or at or past
// RefreshAt. A token without an expiry is never due.
func RefreshDue(c Credentials, in *catalog.Integration, now time.Time) bool {
	if !CanRefresh(c, in) {
		return false
	}
	if c.AccessToken == "" {
		return true
	}
	return !c.ExpiresAt.IsZero() && !now.Before(RefreshAt(c, in))
}

// defaultExpiry gives an OAuth access token without a known expiry the
// catalog's TokenLifetime from when it was issued (Salesforce's token
// responses carry no expires_in), so that it is refreshed ahead of time
// and a 401 after its real expiry is seen as an expired token, not as
// rejected credentials.
func defaultExpiry(c *Credentials, in *catalog.Integration) {
	if in.AuthType != catalog.AuthOAuth2 || c.AccessToken == "" || !c.ExpiresAt.IsZero() || c.IssuedAt.IsZero() {
		return
	}
	c.ExpiresAt = c.IssuedAt.Add(in.TokenLifetimeOrDefault())
}

// jittered spreads an interval by up to +10% so that connections that
// changed together do not come due together.
func jittered(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	return d + rand.N(d/10+1)
}
