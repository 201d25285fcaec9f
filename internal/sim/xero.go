package sim

import (
	"cmp"
	"net/http"
	"time"
)

// xeroJWTHeader is the first part of the access tokens, which are JWTs at
// Xero (the simulation never reads them).
const xeroJWTHeader = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjFDQUY4RTY2NzcyRDZEQzAyOEQ2NzI2RkQwMjYxNTgxNTcwRUZDMTkiLCJ0eXAiOiJKV1QifQ"

// newXero is a Xero-like OAuth provider: /connections as the check (it
// needs no tenant), expires_in on every token answer, rotating refresh
// tokens whose previous one stays usable for a grace period.
func newXero(p *Providers) *oauthProvider {
	// expires_in is whole seconds: make the real lifetime match it.
	ttl := max(time.Second, p.t.XeroTokenTTL.Truncate(time.Second))
	o := newOAuthProvider(p, oauthFlavor{})
	o.flavor = oauthFlavor{
		ttl:   ttl,
		grace: p.t.XeroGrace,
		newFamily: func(f *family) {
			f.tenant = Tenant{ID: p.uuid(), Name: title(f.account) + " Ltd"}
			f.connectionID = p.uuid()
			f.authEventID = p.uuid()
		},
		accessToken: func(*family) string {
			return xeroJWTHeader + "." + p.randString(120, b64url) + "." + p.randString(86, b64url)
		},
		refreshToken: func() string { return p.randString(64, lowHex) },
		tokenBody: func(f *family, access, refresh string, _ time.Time, ttl time.Duration) any {
			return map[string]any{
				"access_token":  access,
				"expires_in":    int(ttl / time.Second),
				"token_type":    "Bearer",
				"refresh_token": refresh,
				"scope":         cmp.Or(f.scope, "offline_access accounting.settings accounting.transactions"),
			}
		},
		clientError: func(w http.ResponseWriter, _ bool) {
			writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_client"})
		},
		invalidGrant: func(w http.ResponseWriter) {
			writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_grant"})
		},
		checkOK: func(w http.ResponseWriter, f *family) {
			const xeroTime = "2006-01-02T15:04:05.0000000"
			writeJSON(w, http.StatusOK, []map[string]any{{
				"id":             f.connectionID,
				"authEventId":    f.authEventID,
				"tenantId":       f.tenant.ID,
				"tenantType":     "ORGANISATION",
				"tenantName":     f.tenant.Name,
				"createdDateUtc": f.created.UTC().Format(xeroTime),
				"updatedDateUtc": f.created.UTC().Format(xeroTime),
			}})
		},
		checkRejected: func(w http.ResponseWriter, expired bool, at time.Time) {
			detail := "AuthenticationUnsuccessful"
			if expired {
				detail = "TokenExpired: token expired at " + at.UTC().Format("01/02/2006 15:04:05")
			}
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			writeJSON(w, http.StatusUnauthorized, map[string]any{
				"Type": nil, "Title": "Unauthorized", "Status": http.StatusUnauthorized,
				"Detail": detail, "Instance": p.uuid(), "Extensions": map[string]any{},
			})
		},
	}
	return o
}
