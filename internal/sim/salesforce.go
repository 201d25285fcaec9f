package sim

import (
	"cmp"
	"net/http"
	"strconv"
	"time"
)

// newSalesforce is a Salesforce-like OAuth provider: userinfo as the check,
// token answers without expires_in, rotating refresh tokens, no grace.
func newSalesforce(p *Providers) *oauthProvider {
	o := newOAuthProvider(p, oauthFlavor{})
	o.flavor = oauthFlavor{
		// Whole seconds, like the catalog's token_lifetime.
		ttl:         max(time.Second, p.t.SalesforceTokenTTL.Truncate(time.Second)),
		instanceURL: true,
		newFamily: func(f *family) {
			f.orgID = "00D" + p.randString(15, alnum)
			f.userID = "005" + p.randString(15, alnum)
		},
		accessToken: func(f *family) string {
			return f.orgID + "!" + p.randString(96, alnum+".")
		},
		refreshToken: func() string { return "5Aep861" + p.randString(80, alnum+".") },
		tokenBody: func(f *family, access, refresh string, now time.Time, _ time.Duration) any {
			// Like Salesforce: no expires_in; issued_at in milliseconds,
			// as a string.
			return map[string]string{
				"access_token":  access,
				"refresh_token": refresh,
				"signature":     p.randString(43, b64url) + "=",
				"scope":         cmp.Or(f.scope, "refresh_token api id"),
				"instance_url":  o.srv.url,
				"id":            o.srv.url + "/id/" + f.orgID + "/" + f.userID,
				"token_type":    "Bearer",
				"issued_at":     strconv.FormatInt(now.UnixMilli(), 10),
			}
		},
		clientError: func(w http.ResponseWriter, unknownID bool) {
			if unknownID {
				writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_client_id", Description: "client identifier invalid"})
				return
			}
			writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_client", Description: "invalid client credentials"})
		},
		invalidGrant: func(w http.ResponseWriter) {
			writeJSON(w, http.StatusBadRequest, oauthError{Error: "invalid_grant", Description: "expired access/refresh token"})
		},
		checkOK: func(w http.ResponseWriter, f *family) {
			user := "admin@" + f.account + ".example"
			writeJSON(w, http.StatusOK, map[string]any{
				"sub":                o.srv.url + "/id/" + f.orgID + "/" + f.userID,
				"user_id":            f.userID,
				"organization_id":    f.orgID,
				"preferred_username": user,
				"nickname":           "admin",
				"name":               title(f.account) + " Admin",
				"email":              user,
				"email_verified":     true,
				"zoneinfo":           "Europe/Amsterdam",
				"locale":             "en_US",
				"user_type":          "STANDARD",
				"active":             true,
				"updated_at":         f.created.UTC().Format("2006-01-02T15:04:05Z"),
			})
		},
		checkRejected: func(w http.ResponseWriter, _ bool, _ time.Time) {
			w.Header().Set("WWW-Authenticate", `Token`)
			writeJSON(w, http.StatusUnauthorized, []map[string]string{{
				"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID",
			}})
		},
	}
	return o
}

func (o *oauthProvider) handler() http.Handler {
	mux := o.srv.newMux(o.p)
	switch o.srv.id {
	case Salesforce:
		o.srv.route(o.p, mux, "GET /services/oauth2/userinfo", EndpointCheck, o.check)
		o.srv.route(o.p, mux, "POST /services/oauth2/token", EndpointToken, o.token)
		o.srv.route(o.p, mux, "/services/oauth2/authorize", EndpointAuthorize, o.authorize)
		o.srv.route(o.p, mux, "POST /services/oauth2/revoke", EndpointOther, o.revokeEndpoint)
	case Xero:
		o.srv.route(o.p, mux, "GET /connections", EndpointCheck, o.check)
		o.srv.route(o.p, mux, "POST /connect/token", EndpointToken, o.token)
		o.srv.route(o.p, mux, "/identity/connect/authorize", EndpointAuthorize, o.authorize)
		o.srv.route(o.p, mux, "POST /connect/revocation", EndpointOther, o.revokeEndpoint)
	}
	return mux
}

// title upper-cases the first letter of an ASCII name.
func title(s string) string {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return s
	}
	return string(s[0]-'a'+'A') + s[1:]
}
