package faults

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// fault is how an endpoint misbehaves.
type fault int

const (
	faultNone    fault = iota
	fault5xx           // 503 at once
	faultTimeout       // no answer until the client gives up (or hang passes)
	faultMixed         // alternately 502 and a timeout
)

// provider is an in-test API provider on 127.0.0.1 that behaves like a
// real one: an OAuth2 token endpoint that rotates refresh tokens on every
// exchange and answers invalid_grant to a reused or unknown one (or, with
// grace, accepts the previous one for a while, as Xero does), check
// endpoints for bearer access tokens and for API keys, and switches for
// outages, slow answers and auth incidents. It counts everything.
type provider struct {
	srv  *httptest.Server
	stop chan struct{}

	mu           sync.Mutex
	lifetime     time.Duration // of issued access tokens
	grace        time.Duration // a rotated refresh token stays usable this long
	tokenDelay   time.Duration // every token answer waits this long
	tokenFault   fault
	checkFault   fault
	hang         time.Duration // how long a timeout fault holds a request
	clientSecret string
	incident     map[string]bool          // credential owners answered 401 during an auth incident
	slowKeys     map[string]time.Duration // key owners whose checks take this long

	lineages map[string]*lineage
	rts      map[string]*rtState
	ats      map[string]*atState
	keys     map[string]*keyState

	// Counters.
	exchanges, rotations, reuses, graceReuses, unknownRT, revokedAnswers int
	invalidClient, token5xx, tokenTimeouts                               int
	checks, checkOK, check401, check5xx, checkTimeouts, redirects        int
	mixed                                                                int
}

// lineage is one OAuth grant (one connection): its current refresh token.
type lineage struct {
	owner      string
	current    string
	revoked    bool // revoked by the test: a genuine revocation
	inflight   int  // token requests being answered now
	maxInfl    int
	exchanges  int
	rotations  int
	reuses     int
	checks     int
	lastCheck  time.Time
	lastOK     time.Time
	lastExchge time.Time
	lastAnswer time.Time // when the latest token answer was sent
}

type rtState struct {
	ln        *lineage
	exchanges int
	rotatedAt time.Time // zero while current
}

type atState struct {
	ln      *lineage
	expires time.Time
}

// keyState is one API key.
type keyState struct {
	owner     string
	valid     bool
	redirect  bool // answered with a redirect to a host nobody allows
	checks    int
	lastCheck time.Time
	lastOK    time.Time
}

func newProvider(t *testing.T) *provider {
	p := &provider{stop: make(chan struct{}), lifetime: time.Hour, hang: 20 * time.Second,
		clientSecret: "faults-client-secret-0123456789", incident: map[string]bool{}, slowKeys: map[string]time.Duration{},
		lineages: map[string]*lineage{}, rts: map[string]*rtState{}, ats: map[string]*atState{}, keys: map[string]*keyState{}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /oauth/token", p.token)
	mux.HandleFunc("GET /oauth/check", p.oauthCheck)
	mux.HandleFunc("GET /key/check", p.keyCheck)
	p.srv = httptest.NewServer(mux)
	t.Cleanup(func() {
		close(p.stop)
		p.srv.CloseClientConnections()
		p.srv.Close()
	})
	return p
}

func (p *provider) host() string {
	u, _ := url.Parse(p.srv.URL)
	return u.Host
}

func secret(prefix string) string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// mint starts a lineage for owner: an access token expiring at exp and a
// refresh token.
func (p *provider) mint(owner string, exp time.Time) (at, rt string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ln := &lineage{owner: owner}
	p.lineages[owner] = ln
	at, rt = secret("at-"), secret("rt-")
	ln.current = rt
	p.rts[rt] = &rtState{ln: ln}
	p.ats[at] = &atState{ln: ln, expires: exp}
	return at, rt
}

// addKey registers an API key; valid says whether the provider accepts it.
func (p *provider) addKey(owner string, valid bool) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := secret("key-")
	p.keys[k] = &keyState{owner: owner, valid: valid}
	return k
}

// addRedirectKey registers a key whose checks are redirected off the
// allowed hosts (a consumer's own misconfigured account).
func (p *provider) addRedirectKey(owner string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := secret("redir-")
	p.keys[k] = &keyState{owner: owner, valid: true, redirect: true}
	return k
}

func (p *provider) revokeKey(k string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys[k].valid = false
}

func (p *provider) set(f func(p *provider)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

func (p *provider) wait(d time.Duration, r *http.Request) {
	select {
	case <-time.After(d):
	case <-p.stop:
	case <-r.Context().Done():
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// faultAnswer answers per f and reports whether it did.
func (p *provider) faultAnswer(w http.ResponseWriter, r *http.Request, f fault, hang time.Duration, n5xx, nTimeout *int) bool {
	if f == faultMixed {
		p.mixed++
		if p.mixed%2 == 0 {
			f = fault5xx
		} else {
			f = faultTimeout
		}
	}
	switch f {
	case fault5xx:
		*n5xx++
		p.mu.Unlock()
		writeJSON(w, http.StatusBadGateway, map[string]string{"error": "upstream unavailable"})
		p.mu.Lock()
		return true
	case faultTimeout:
		*nTimeout++
		p.mu.Unlock()
		p.wait(hang, r)
		writeJSON(w, http.StatusGatewayTimeout, map[string]string{"error": "timeout"})
		p.mu.Lock()
		return true
	}
	return false
}

// token is the refresh_token grant: rotate on every exchange.
func (p *provider) token(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_request"})
		return
	}
	id, sec := r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	if u, pw, ok := r.BasicAuth(); ok {
		id, sec = u, pw
	}
	p.mu.Lock()
	if p.faultAnswer(w, r, p.tokenFault, p.hang, &p.token5xx, &p.tokenTimeouts) {
		p.mu.Unlock()
		return
	}
	if id == "" || sec != p.clientSecret {
		p.invalidClient++
		p.mu.Unlock()
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid_client", "error_description": "client authentication failed"})
		return
	}
	rt := r.PostForm.Get("refresh_token")
	st := p.rts[rt]
	if r.PostForm.Get("grant_type") != "refresh_token" || st == nil {
		p.unknownRT++
		p.mu.Unlock()
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_grant"})
		return
	}
	ln := st.ln
	st.exchanges++
	p.exchanges++
	ln.exchanges++
	ln.lastExchge = time.Now()
	ln.inflight++
	ln.maxInfl = max(ln.maxInfl, ln.inflight)
	delay := p.tokenDelay
	var body map[string]any
	status := http.StatusOK
	switch {
	case ln.revoked:
		p.revokedAnswers++
		status, body = http.StatusBadRequest, map[string]any{"error": "invalid_grant", "error_description": "revoked"}
	case ln.current != rt && (p.grace == 0 || time.Since(st.rotatedAt) > p.grace):
		// Reuse of a rotated refresh token.
		p.reuses++
		ln.reuses++
		status, body = http.StatusBadRequest, map[string]any{"error": "invalid_grant", "error_description": "refresh token reused"}
	default:
		if ln.current != rt {
			p.graceReuses++
		}
		// Rotate now: the provider has rotated whether or not the caller
		// ever reads the answer.
		now := time.Now()
		if cur := p.rts[ln.current]; cur != nil && cur.rotatedAt.IsZero() {
			cur.rotatedAt = now
		}
		at, nrt := secret("at-"), secret("rt-")
		ln.current = nrt
		ln.rotations++
		p.rotations++
		p.rts[nrt] = &rtState{ln: ln}
		p.ats[at] = &atState{ln: ln, expires: now.Add(p.lifetime)}
		body = map[string]any{"access_token": at, "refresh_token": nrt, "token_type": "Bearer",
			"expires_in": int(p.lifetime / time.Second)}
	}
	p.mu.Unlock()
	if delay > 0 {
		p.wait(delay, r)
	}
	p.mu.Lock()
	ln.inflight--
	ln.lastAnswer = time.Now()
	p.mu.Unlock()
	writeJSON(w, status, body)
}

func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if v, ok := strings.CutPrefix(h, "Bearer "); ok {
		return v
	}
	return ""
}

func (p *provider) oauthCheck(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	p.checks++
	st := p.ats[bearer(r)]
	if st != nil {
		st.ln.checks++
		st.ln.lastCheck = time.Now()
	}
	if p.faultAnswer(w, r, p.checkFault, p.hang, &p.check5xx, &p.checkTimeouts) {
		p.mu.Unlock()
		return
	}
	if st == nil || st.ln.revoked || time.Now().After(st.expires) || p.incident[st.ln.owner] {
		p.check401++
		p.mu.Unlock()
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid_token"})
		return
	}
	st.ln.lastOK = time.Now()
	p.checkOK++
	p.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"user": map[string]any{"id": 42}})
}

func (p *provider) keyCheck(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	p.checks++
	k := p.keys[r.Header.Get("X-API-Key")]
	if k != nil {
		k.checks++
		k.lastCheck = time.Now()
	}
	if k != nil && p.slowKeys[k.owner] > 0 {
		d := p.slowKeys[k.owner]
		p.mu.Unlock()
		p.wait(d, r)
		p.mu.Lock()
	}
	if k != nil && k.redirect {
		p.redirects++
		p.mu.Unlock()
		http.Redirect(w, r, "http://169.254.169.254/latest/meta-data/", http.StatusFound)
		return
	}
	if p.faultAnswer(w, r, p.checkFault, p.hang, &p.check5xx, &p.checkTimeouts) {
		p.mu.Unlock()
		return
	}
	if k == nil || !k.valid || p.incident[k.owner] {
		p.check401++
		p.mu.Unlock()
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid api key"})
		return
	}
	k.lastOK = time.Now()
	p.checkOK++
	p.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"user": map[string]any{"id": 42}})
}

// settleTime is how long after the provider's answer the fleet has to
// store the tokens before a stale stored refresh token counts as lost.
const settleTime = 5 * time.Second

// rtLost reports whether the refresh token the fleet stores for ln is one
// the provider has rotated away, with no exchange of the lineage in flight
// and its latest answer settleTime old: the newest rotation is lost.
func (p *provider) rtLost(owner, stored string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ln := p.lineages[owner]
	if ln == nil || stored == ln.current {
		return false
	}
	return ln.inflight == 0 && time.Since(ln.lastAnswer) > settleTime
}

// current returns the lineage's current refresh token.
func (p *provider) current(owner string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ln := p.lineages[owner]; ln != nil {
		return ln.current
	}
	return ""
}

// inflightOwners lists the lineages with a token request being answered
// now.
func (p *provider) inflightOwners() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for owner, ln := range p.lineages {
		if ln.inflight > 0 {
			out = append(out, owner)
		}
	}
	return out
}

// answeredSince lists the lineages whose latest token answer was sent at
// or after t.
func (p *provider) answeredSince(t time.Time) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for owner, ln := range p.lineages {
		if !ln.lastAnswer.Before(t) {
			out = append(out, owner)
		}
	}
	return out
}

// inflightTotal is the number of token requests being answered now.
func (p *provider) inflightTotal() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, ln := range p.lineages {
		n += ln.inflight
	}
	return n
}

// dupExchanges is, over every refresh token, the exchanges beyond the
// first: the same rotation asked for more than once.
func (p *provider) dupExchanges() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, st := range p.rts {
		if st.exchanges > 1 {
			n += st.exchanges - 1
		}
	}
	return n
}

// maxConcurrentExchanges is the most token requests one lineage ever had
// in flight at once.
func (p *provider) maxConcurrentExchanges() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := 0
	for _, ln := range p.lineages {
		m = max(m, ln.maxInfl)
	}
	return m
}

// webhookReceiver records deliveries by idempotency key; it can be down
// (503 with Retry-After: 1).
type webhookReceiver struct {
	srv        *httptest.Server
	mu         sync.Mutex
	down       bool
	attempts   int
	refused    int
	deliveries map[string]int
	types      map[string]int
}

func newWebhookReceiver(t *testing.T) *webhookReceiver {
	h := &webhookReceiver{deliveries: map[string]int{}, types: map[string]int{}}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev struct {
			Type string `json:"type"`
		}
		_ = json.NewDecoder(r.Body).Decode(&ev)
		h.mu.Lock()
		defer h.mu.Unlock()
		h.attempts++
		if h.down {
			h.refused++
			w.Header().Set("Retry-After", "1")
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		h.deliveries[r.Header.Get("X-Vaultfleet-Idempotency-Key")]++
		h.types[ev.Type]++
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *webhookReceiver) setDown(down bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.down = down
}
