package sim

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"
)

// keyProvider is an API-key provider: BambooHR (keys per company
// subdomain) or Pipedrive (the flaky one).
type keyProvider struct {
	holder
	p *Providers
	// flaky: outage windows of 5xx and 429.
	flaky bool

	mu       sync.Mutex
	keys     map[string]*apiKey
	accounts map[string]bool
	// forcedUntil ends an outage started by StartOutage.
	forcedUntil time.Time
	// lastOutage is the number of the outage window last logged.
	lastOutage int64
	userIDs    int
}

type apiKey struct {
	account  string
	userID   int
	revokeAt time.Time // zero: never
}

func (k *apiKey) valid(now time.Time) bool { return k.revokeAt.IsZero() || now.Before(k.revokeAt) }

func newBambooHR(p *Providers) *keyProvider {
	return &keyProvider{p: p, keys: map[string]*apiKey{}, accounts: map[string]bool{}, lastOutage: -1, userIDs: 100}
}

func newPipedrive(p *Providers) *keyProvider {
	k := newBambooHR(p)
	k.flaky = true
	k.userIDs = 12000000
	return k
}

func (k *keyProvider) issue(opts issueOptions, now time.Time) APIKey {
	account := opts.account
	if account == "" {
		account = "company" + k.p.randString(5, "0123456789")
	}
	key := k.p.randString(40, lowHex)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.userIDs++
	ak := &apiKey{account: account, userID: k.userIDs}
	if opts.revoke {
		ak.revokeAt = now.Add(opts.revokeAfter)
	}
	k.keys[key] = ak
	k.accounts[account] = true
	if k.flaky {
		return APIKey{Key: key}
	}
	return APIKey{Key: key, Subdomain: account}
}

func (k *keyProvider) revoke(key string, now time.Time) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	ak, ok := k.keys[key]
	if !ok {
		return fmt.Errorf("%w: no such key", ErrUnknownCredential)
	}
	if ak.revokeAt.IsZero() || ak.revokeAt.After(now) {
		ak.revokeAt = now
	}
	k.p.log.Info("simulated API key revoked", slog.String("provider", k.srv.id), slog.String("account", ak.account))
	return nil
}

func (k *keyProvider) revocations(now time.Time) int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	var n int64
	for _, ak := range k.keys {
		if !ak.valid(now) {
			n++
		}
	}
	return n
}

// lookup returns the key's record if it is live (and, when account is
// not empty, belongs to that account).
func (k *keyProvider) lookup(key, account string, now time.Time) (apiKey, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ak, ok := k.keys[key]
	if !ok || !ak.valid(now) || (account != "" && ak.account != account) {
		return apiKey{}, false
	}
	return *ak, true
}

func (k *keyProvider) knownAccount(account string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.accounts[account]
}

func (k *keyProvider) handler() http.Handler {
	mux := k.srv.newMux(k.p)
	if k.flaky {
		k.srv.route(k.p, mux, "GET /v1/users/me", EndpointCheck, k.pipedriveMe)
	} else {
		k.srv.route(k.p, mux, "GET /api/gateway.php/{subdomain}/v1/meta/fields", EndpointCheck, k.bambooFields)
	}
	return mux
}

// --- BambooHR ---

// bambooFields serves GET /api/gateway.php/{subdomain}/v1/meta/fields: the
// API key is the basic-auth user name, the password anything.
func (k *keyProvider) bambooFields(w http.ResponseWriter, r *http.Request) {
	sub := r.PathValue("subdomain")
	if !k.knownAccount(sub) {
		w.Header().Set("Content-Type", "text/html; charset=UTF-8")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte("<html><body><h1>404 Not Found</h1><p>The company you are looking for does not exist.</p></body></html>\n"))
		return
	}
	key, _, ok := r.BasicAuth()
	if !ok {
		key = ""
	}
	if _, ok := k.lookup(key, sub, k.p.now()); !ok {
		w.Header().Set("WWW-Authenticate", `Basic realm="BambooHR API"`)
		w.Header().Set("X-BambooHR-Error-Message", "Invalid API key")
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	if strings.Contains(r.Header.Get("Accept"), "json") {
		writeJSON(w, http.StatusOK, bambooFieldList)
		return
	}
	// BambooHR answers XML unless asked for JSON.
	w.Header().Set("Content-Type", "text/xml; charset=UTF-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write([]byte(`<?xml version="1.0"?>` + "\n<fields>\n" +
		`<field id="1" type="text" alias="firstName">First Name</field>` + "\n" +
		`<field id="2" type="text" alias="lastName">Last Name</field>` + "\n" +
		`<field id="4" type="email" alias="workEmail">Work Email</field>` + "\n</fields>\n"))
}

var bambooFieldList = []map[string]string{
	{"id": "1", "name": "First Name", "type": "text", "alias": "firstName"},
	{"id": "2", "name": "Last Name", "type": "text", "alias": "lastName"},
	{"id": "4", "name": "Work Email", "type": "email", "alias": "workEmail"},
	{"id": "17", "name": "Job Title", "type": "list", "alias": "jobTitle"},
	{"id": "4047", "name": "Department", "type": "list", "alias": "department"},
	{"id": "1610", "name": "Hire Date", "type": "date", "alias": "hireDate"},
}

// --- Pipedrive (flaky) ---

// pipedriveMe serves GET /v1/users/me with the key in x-api-token (or the
// api_token query parameter). During an outage every request gets 5xx or
// 429, whatever its key: the provider never rejects a valid key.
func (k *keyProvider) pipedriveMe(w http.ResponseWriter, r *http.Request) {
	now := k.p.now()
	if k.inOutage(now) {
		k.outageAnswer(w)
		return
	}
	key := r.Header.Get("x-api-token")
	if key == "" {
		key = r.URL.Query().Get("api_token")
	}
	ak, ok := k.lookup(key, "", now)
	if !ok {
		writeJSON(w, http.StatusUnauthorized, map[string]any{
			"success": false, "error": "unauthorized access", "errorCode": http.StatusUnauthorized,
			"error_info": "Please check developers.pipedrive.com for more information about Pipedrive API.",
		})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"success": true,
		"data": map[string]any{
			"id": ak.userID, "name": title(ak.account) + " Admin", "email": "admin@" + ak.account + ".example",
			"company_id": ak.userID % 100000, "company_name": title(ak.account), "company_domain": ak.account,
			"active_flag": true, "is_admin": 1, "locale": "en_US", "timezone_name": "Europe/Amsterdam",
		},
	})
}

// forceOutage starts an outage until t.
func (k *keyProvider) forceOutage(until time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if until.After(k.forcedUntil) {
		k.forcedUntil = until
	}
	k.p.log.Info("simulated outage started", slog.String("provider", k.srv.id), slog.Time("until", until))
}

// inOutage reports whether now is in an outage: a forced one, or one of the
// windows that begin at OutageStart and then every OutageEvery, each
// lasting OutageFor.
func (k *keyProvider) inOutage(now time.Time) bool {
	t := k.p.t
	k.mu.Lock()
	defer k.mu.Unlock()
	if now.Before(k.forcedUntil) {
		return true
	}
	el := now.Sub(k.p.start) - t.OutageStart
	if el < 0 || t.OutageEvery <= 0 || t.OutageFor <= 0 {
		return false
	}
	n, into := int64(el/t.OutageEvery), el%t.OutageEvery
	if into >= t.OutageFor {
		return false
	}
	if n != k.lastOutage {
		k.lastOutage = n
		k.p.log.Info("simulated outage", slog.String("provider", k.srv.id),
			slog.Duration("for", t.OutageFor-into), slog.Duration("next_in", t.OutageEvery-into))
	}
	return true
}

// outageAnswer is a 502 or 503 with an HTML body (a proxy in front of the
// API), or a 429 with Retry-After: 1.
func (k *keyProvider) outageAnswer(w http.ResponseWriter) {
	switch f := k.p.randFloat(); {
	case f < 0.4:
		writeHTML(w, http.StatusBadGateway, "502 Bad Gateway")
	case f < 0.7:
		writeHTML(w, http.StatusServiceUnavailable, "503 Service Temporarily Unavailable")
	default:
		w.Header().Set("Retry-After", "1")
		w.Header().Set("X-RateLimit-Limit", "80")
		w.Header().Set("X-RateLimit-Remaining", "0")
		w.Header().Set("X-RateLimit-Reset", "1")
		writeJSON(w, http.StatusTooManyRequests, map[string]any{
			"success": false, "error": "Request over limit", "errorCode": http.StatusTooManyRequests,
		})
	}
}

func writeHTML(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/html")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, "<html>\r\n<head><title>%s</title></head>\r\n<body>\r\n<center><h1>%s</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n", msg, msg)
}
