package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/retry"
	"github.com/vaultfleet/vaultfleet/state"
)

// kind is what a check result means.
type kind int

const (
	kindTransient kind = iota
	kindValid
	kindInvalid
	// kindThrottled is a 429: transient, with the provider's Retry-After.
	kindThrottled
	// kindMisconfigured is a check the consumer's own settings made fail
	// (a host from its settings that does not resolve or refuses
	// connections, a redirect the catalog refuses): no verdict, no
	// provider trouble; the connection's health says misconfigured.
	kindMisconfigured
)

func (k kind) String() string {
	switch k {
	case kindValid:
		return outcomeValid
	case kindInvalid:
		return outcomeInvalid
	case kindThrottled:
		return outcomeRateLimited
	case kindMisconfigured:
		return outcomeMisconfigured
	}
	return outcomeTransient
}

// checkResult is what one check request told.
type checkResult struct {
	kind   kind
	reason string
	status int
	// retryAfter is the provider's Retry-After (429, 503), if any.
	retryAfter time.Duration
	latency    time.Duration
	// sent is false when no request left the worker (refused URL).
	sent bool
	// msg describes a transient failure; never a secret.
	msg string
}

// errMisconfigured marks a check request that cannot be built from the
// connection's settings (a host the catalog does not allow, a setting the
// URL needs that is missing, a credential the auth scheme needs).
var errMisconfigured = errors.New("worker: check request cannot be built from the connection")

// userAgent is sent with every request.
const userAgent = "vaultfleet-worker/1"

// buildCheckRequest builds the check request of c from its integration:
// URL and headers from the catalog templates over c's settings, and the
// credentials per the integration's auth scheme.
func buildCheckRequest(ctx context.Context, in *catalog.Integration, c *state.Connection) (*http.Request, error) {
	u, err := in.CheckURL(c.Settings)
	if err != nil {
		return nil, fmt.Errorf("%w: check url: %w", errMisconfigured, err)
	}
	hdr, err := in.CheckHeaders(c.Settings)
	if err != nil {
		return nil, fmt.Errorf("%w: check headers: %w", errMisconfigured, err)
	}
	method := strings.ToUpper(in.Check.Method)
	if method == "" {
		method = http.MethodGet
	}
	auth := in.Check.Auth
	scheme := auth.Scheme
	if scheme == "" {
		switch in.AuthType {
		case catalog.AuthOAuth2:
			scheme = "bearer"
		case catalog.AuthBasic:
			scheme = "basic"
		default:
			scheme = "header"
		}
	}
	field := auth.Field
	if field == "" {
		if in.AuthType == catalog.AuthOAuth2 {
			field = catalog.FieldAccessToken
		} else {
			field = catalog.FieldAPIKey
		}
	}
	creds := c.Credentials
	need := func(f string) (string, error) {
		v := creds.Get(f)
		if v == "" {
			return "", fmt.Errorf("%w: credential field %s is empty", errMisconfigured, f)
		}
		if !validHeaderValue(v) {
			// Stored before values were checked on write, or a token
			// endpoint's answer: sent, it would make an invalid request.
			return "", fmt.Errorf("%w: credential field %s holds a control character", errMisconfigured, f)
		}
		return v, nil
	}
	var basicUser, basicPass string
	switch scheme {
	case "bearer":
		v, err := need(field)
		if err != nil {
			return nil, err
		}
		hdr.Set("Authorization", "Bearer "+v)
	case "header":
		v, err := need(field)
		if err != nil {
			return nil, err
		}
		name := auth.Name
		if name == "" {
			name = "X-API-Key"
		}
		hdr.Set(name, auth.Prefix+v)
	case "query":
		v, err := need(field)
		if err != nil {
			return nil, err
		}
		name := auth.Name
		if name == "" {
			name = field
		}
		q := u.Query()
		q.Set(name, v)
		u.RawQuery = q.Encode()
	case "basic":
		user, pass := auth.Username, auth.Password
		if user == "" && pass == "" {
			user, pass = catalog.FieldUsername, catalog.FieldPassword
		}
		if basicUser, err = basicPart(creds, user, true); err != nil {
			return nil, err
		}
		if basicPass, err = basicPart(creds, pass, false); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: unknown auth scheme %q", errMisconfigured, scheme)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %s", errMisconfigured, "check request")
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	if scheme == "basic" {
		req.SetBasicAuth(basicUser, basicPass)
	}
	if req.Header.Get("Accept") == "" {
		req.Header.Set("Accept", "application/json")
	}
	req.Header.Set("User-Agent", userAgent)
	return req, nil
}

// validHeaderValue reports whether v can go into a header value: no
// control character but tab, no DEL (net/http refuses to send others).
func validHeaderValue(v string) bool {
	return !strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f })
}

// basicPart resolves a basic-auth part: "literal:x" is x itself, an empty
// spec is "", otherwise the named credential field (which the user part
// needs non-empty).
func basicPart(creds state.Credentials, spec string, required bool) (string, error) {
	if lit, ok := strings.CutPrefix(spec, "literal:"); ok {
		return lit, nil
	}
	if spec == "" {
		return "", nil
	}
	v := creds.Get(spec)
	if v == "" && required {
		return "", fmt.Errorf("%w: credential field %s is empty", errMisconfigured, spec)
	}
	return v, nil
}

// httpClient returns a client for requests of one integration: every
// redirect target is checked against the integration's host rules, and the
// request never reaches a host the catalog does not allow.
func (w *Worker) httpClient(in *catalog.Integration) *http.Client {
	return &http.Client{Transport: scopedTransport{id: in.ID, inner: w.transport}, CheckRedirect: in.CheckRedirect}
}

// send sends a built check request with the check's timeout and
// classifies the answer. It returns the task context's error, and no
// result, when the task itself was cancelled (shutdown): that is no
// provider trouble.
func (w *Worker) send(ctx context.Context, in *catalog.Integration, req *http.Request) (checkResult, error) {
	timeout := in.Check.Timeout.D()
	if timeout <= 0 {
		timeout = w.cfg.CheckTimeout
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	resp, err := w.httpClient(in).Do(req.WithContext(cctx))
	if err != nil {
		lat := time.Since(start)
		if ctx.Err() != nil {
			return checkResult{}, ctx.Err()
		}
		if errors.Is(err, errAddressNotAllowed) {
			// Refused before anything left: the consumer's setting (or
			// its DNS) points inside, the provider is not at fault, so the
			// breaker does not count it.
			return checkResult{kind: kindMisconfigured, msg: transportMsg(err)}, nil
		}
		k := kindTransient
		if consumerSide(in, req.URL, err) {
			k = kindMisconfigured
		}
		return checkResult{kind: k, sent: true, latency: lat, msg: transportMsg(err)}, nil
	}
	body, over, rerr := readCapped(resp.Body, w.cfg.MaxBodyBytes)
	_ = resp.Body.Close()
	lat := time.Since(start)
	if rerr != nil && ctx.Err() != nil {
		return checkResult{}, ctx.Err()
	}
	res := classify(in, resp.StatusCode, resp.Header, body, over, rerr, w.now())
	res.latency, res.sent = lat, true
	return res, nil
}

// readCapped reads at most limit bytes of r; over reports that there was
// more.
func readCapped(r io.Reader, limit int64) (body []byte, over bool, err error) {
	body, err = io.ReadAll(io.LimitReader(r, limit+1))
	if int64(len(body)) > limit {
		return body[:limit], true, err
	}
	return body, false, err
}

// classify turns a check answer into a result (DESIGN.md "Verdicts").
func classify(in *catalog.Integration, status int, h http.Header, body []byte, over bool, readErr error, now time.Time) checkResult {
	r := checkResult{status: status}
	switch {
	case status >= 200 && status < 300:
		if in.Check.Assert == nil || in.Check.Assert.Path == "" {
			r.kind, r.reason = kindValid, state.ReasonCheckPassed
			return r
		}
		if readErr != nil {
			r.kind, r.msg = kindTransient, fmt.Sprintf("status %d: reading the body failed", status)
			return r
		}
		if over {
			r.kind, r.msg = kindTransient, fmt.Sprintf("status %d: body over the %d-byte cap, assertion cannot be judged", status, len(body))
			return r
		}
		if assertHolds(in.Check.Assert, body) {
			r.kind, r.reason = kindValid, state.ReasonCheckPassed
		} else {
			r.kind, r.reason = kindInvalid, state.ReasonAssertionFailed
		}
		return r
	case in.IsInvalidStatus(status):
		r.kind, r.reason = kindInvalid, state.ReasonCredentialsRejected
		if status == http.StatusNotFound {
			r.reason = state.ReasonMisconfiguredAccount
		}
		return r
	case status == http.StatusTooManyRequests:
		r.kind, r.msg = kindThrottled, "status 429"
		r.retryAfter = retry.HeaderAfter(h, now)
		return r
	case status == http.StatusServiceUnavailable:
		r.retryAfter = retry.HeaderAfter(h, now)
	}
	r.kind, r.msg = kindTransient, "status "+strconv.Itoa(status)
	return r
}

// assertHolds reports whether the value at a's dotted path in the JSON
// body exists and (with NotNull) is not null. A numeric segment indexes an
// array.
func assertHolds(a *catalog.Assertion, body []byte) bool {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return false
	}
	for seg := range strings.SplitSeq(a.Path, ".") {
		switch cur := v.(type) {
		case map[string]any:
			next, ok := cur[seg]
			if !ok {
				return false
			}
			v = next
		case []any:
			i, err := strconv.Atoi(seg)
			if err != nil || i < 0 || i >= len(cur) {
				return false
			}
			v = cur[i]
		default:
			return false
		}
	}
	if a.NotNull && v == nil {
		return false
	}
	return true
}

// consumerSide reports whether a transport failure of a request to u is
// the consumer's own misconfiguration rather than provider trouble: a
// redirect the catalog's host rules refuse; or, when u's host came from
// the consumer's settings (not one of the provider's own hosts fixed in
// the catalog), a name that does not resolve or an address where nothing
// accepts connections. A server that was reached and then failed
// (timeout after connecting, reset, TLS) is the provider's trouble
// wherever it is.
func consumerSide(in *catalog.Integration, u *url.URL, err error) bool {
	if errors.Is(err, catalog.ErrHostNotAllowed) {
		return true
	}
	if in.ProviderHost(u) {
		return false
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return !dnsErr.IsTimeout && !dnsErr.IsTemporary || dnsErr.IsNotFound
	}
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "dial" && !opErr.Timeout()
}

// transportMsg names a transport failure without secrets: timeout, DNS,
// connection, TLS, refused redirect.
func transportMsg(err error) string {
	var dnsErr *net.DNSError
	var opErr *net.OpError
	switch {
	case errors.Is(err, errAddressNotAllowed):
		return "host resolves to a non-public address the catalog does not list: nothing was sent"
	case errors.Is(err, catalog.ErrHostNotAllowed):
		return "redirect to a host the catalog does not allow: " + safeErr(err)
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return "timeout: " + safeErr(err)
	case errors.As(err, &dnsErr):
		return "dns: " + safeErr(err)
	case errors.As(err, &opErr):
		return "connection: " + safeErr(err)
	}
	return safeErr(err)
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}
