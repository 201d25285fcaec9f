package faults

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vaultfleet/vaultfleet/state"
)

// figures are what every scenario reports. Goals: 0, 0, 0, 0 and a figure.
type figures struct {
	tasksLost     int
	rotationsLost int
	falseInvalid  int
	dupExchanges  int
	recover       time.Duration
	recovered     bool
	extra         []string // "name=value" figures of the scenario
	failures      []string // scenario-specific assertions that did not hold
}

func (g *figures) note(format string, args ...any) {
	g.extra = append(g.extra, fmt.Sprintf(format, args...))
}

func (g *figures) fail(format string, args ...any) {
	g.failures = append(g.failures, fmt.Sprintf(format, args...))
}

// report prints the figures, one summary line last, and fails the test on
// any loss.
func report(t *testing.T, name string, g *figures) {
	t.Helper()
	rec := "not recovered"
	if g.recovered {
		rec = g.recover.Round(100 * time.Millisecond).String()
	}
	for _, e := range g.extra {
		t.Logf("%s: %s", name, e)
	}
	for _, f := range g.failures {
		t.Errorf("%s: %s", name, f)
	}
	verdict := "PASS"
	if g.tasksLost != 0 || g.rotationsLost != 0 || g.falseInvalid != 0 || g.dupExchanges != 0 || !g.recovered || len(g.failures) > 0 {
		verdict = "FAIL"
	}
	t.Logf("SUMMARY %s [%s]: tasks_lost=%d rotations_lost=%d false_invalidations=%d dup_exchanges=%d recover=%s %s",
		name, form(), g.tasksLost, g.rotationsLost, g.falseInvalid, g.dupExchanges, rec, verdict)
	if g.tasksLost != 0 {
		t.Errorf("%s: %d tasks lost", name, g.tasksLost)
	}
	if g.rotationsLost != 0 {
		t.Errorf("%s: %d rotations lost", name, g.rotationsLost)
	}
	if g.falseInvalid != 0 {
		t.Errorf("%s: %d false invalidations", name, g.falseInvalid)
	}
	if g.dupExchanges != 0 {
		t.Errorf("%s: %d duplicate exchanges of one rotation", name, g.dupExchanges)
	}
	if !g.recovered {
		t.Errorf("%s: the fleet did not recover within the deadline", name)
	}
}

// providerValid reports whether the provider accepts consumer's grant or
// key (a genuine revocation or a wrong key is not valid).
func (f *fleet) providerValid(consumer string) bool {
	f.prov.mu.Lock()
	defer f.prov.mu.Unlock()
	if ln := f.prov.lineages[consumer]; ln != nil {
		return !ln.revoked
	}
	f.mu.Lock()
	k := f.keysOf[consumer]
	f.mu.Unlock()
	if ks := f.prov.keys[k]; ks != nil {
		return ks.valid && !ks.redirect
	}
	return false
}

// storedRT reads the refresh token the fleet holds for an OAuth consumer.
func (f *fleet) storedRT(consumer string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := f.store.Get(ctx, state.Ref{ConsumerID: consumer, ConnectionID: state.ConnectionID("crm", svcOAuth)})
	if err != nil {
		return "", err
	}
	return c.Credentials.RefreshToken, nil
}

// auditOpts says what recovered means.
type auditOpts struct {
	// since: the end of the fault; recovery time is measured from it, and
	// every periodic connection must have been checked after it.
	since time.Time
	// consumers to converge (periodically checked ones).
	consumers []string
	// healthOK also wants health ok for every valid connection.
	healthOK bool
	deadline time.Duration
}

// audit waits for the fleet to converge (valid connections callable, with
// the provider's current refresh token, checked after the fault; invalid
// ones invalid) and then counts losses into g.
func (f *fleet) audit(g *figures, o auditOpts) {
	f.t.Helper()
	if o.deadline == 0 {
		o.deadline = pick(75*time.Second, 180*time.Second)
	}
	var last []string
	_, ok := waitFor(o.deadline, 500*time.Millisecond, func() bool {
		last = f.divergent(o)
		return len(last) == 0
	})
	g.recovered = ok
	if ok {
		g.recover = time.Since(o.since)
	} else {
		sort.Strings(last)
		if len(last) > 10 {
			last = append(last[:10], fmt.Sprintf("... %d more", len(last)-10))
		}
		g.note("not converged: %s", strings.Join(last, "; "))
	}
	f.countLosses(g, o.consumers)
}

// divergent lists what still differs from the converged fleet.
func (f *fleet) divergent(o auditOpts) []string {
	conns := f.api.byConsumer()
	if conns == nil {
		return []string{"listing failed"}
	}
	var out []string
	for _, c := range o.consumers {
		v, ok := conns[c]
		if !ok {
			out = append(out, c+": missing")
			continue
		}
		if !f.providerValid(c) {
			if v.State != "invalid" {
				out = append(out, c+": "+v.State+" though revoked")
			}
			continue
		}
		if v.State != "callable" || (o.healthOK && v.Health != "ok") {
			out = append(out, fmt.Sprintf("%s: %s/%s %s", c, v.State, v.Health, v.reason()))
			continue
		}
		f.prov.mu.Lock()
		ln := f.prov.lineages[c]
		var cur string
		var last time.Time
		if ln != nil {
			cur, last = ln.current, ln.lastCheck
		} else if ks := f.prov.keys[f.keyOf(c)]; ks != nil {
			last = ks.lastCheck
		}
		f.prov.mu.Unlock()
		if last.Before(o.since) {
			out = append(out, c+": not checked since the fault")
			continue
		}
		if ln != nil {
			rt, err := f.storedRT(c)
			switch {
			case err != nil:
				out = append(out, c+": stored record unreadable: "+err.Error())
			case rt != cur:
				out = append(out, c+": stored refresh token is not the provider's current one")
			}
		}
	}
	return out
}

func (f *fleet) keyOf(c string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.keysOf[c]
}

// countLosses fills rotations lost, false invalidations and duplicate
// exchanges, and adds archived tasks to tasks lost.
func (f *fleet) countLosses(g *figures, consumers []string) {
	conns := f.api.byConsumer()
	lost := map[string]string{}
	f.prov.mu.Lock()
	reuses := f.prov.reuses
	for owner, ln := range f.prov.lineages {
		if ln.revoked {
			continue
		}
		if ln.reuses > 0 {
			lost[owner] = fmt.Sprintf("%d invalid_grant for a rotated token", ln.reuses)
		}
	}
	f.prov.mu.Unlock()
	for _, c := range consumers {
		f.prov.mu.Lock()
		ln := f.prov.lineages[c]
		cur, revoked := "", false
		if ln != nil {
			cur, revoked = ln.current, ln.revoked
		}
		f.prov.mu.Unlock()
		if ln == nil || revoked {
			continue
		}
		if v, ok := conns[c]; ok && (v.reason() == state.ReasonRotationLost || v.reason() == state.ReasonRefreshTokenRevoked) && v.State == "invalid" {
			lost[c] = "ended invalid, reason " + v.reason()
		}
		if rt, err := f.storedRT(c); err == nil && rt != cur && f.prov.rtLost(c, rt) {
			if _, seen := lost[c]; !seen {
				lost[c] = "stored refresh token is not the provider's current one"
			}
		}
	}
	g.rotationsLost = len(lost)
	// False invalidations: every connection that turned invalid (from the
	// event stream) or is invalid now while the provider accepts it.
	falseInv := map[string]bool{}
	for _, e := range f.events() {
		if e.StateAfter == state.Invalid && e.StateBefore != state.Invalid && f.providerValid(e.ConsumerID) {
			falseInv[e.ConsumerID] = true
		}
	}
	for c, v := range conns {
		if v.State == "invalid" && f.providerValid(c) {
			falseInv[c] = true
		}
	}
	g.falseInvalid = len(falseInv)
	g.dupExchanges = f.prov.dupExchanges()
	arch := f.archived()
	if arch > 0 {
		g.tasksLost += arch
	}
	f.prov.mu.Lock()
	g.note("provider: exchanges=%d rotations=%d reuses(invalid_grant for rotated)=%d grace_reuses=%d unknown_rt=%d invalid_client=%d token_5xx=%d token_timeouts=%d checks=%d ok=%d 401=%d 5xx=%d timeouts=%d",
		f.prov.exchanges, f.prov.rotations, reuses, f.prov.graceReuses, f.prov.unknownRT, f.prov.invalidClient,
		f.prov.token5xx, f.prov.tokenTimeouts, f.prov.checks, f.prov.checkOK, f.prov.check401, f.prov.check5xx, f.prov.checkTimeouts)
	f.prov.mu.Unlock()
	g.note("archived tasks=%d; max concurrent exchanges per connection=%d", arch, f.prov.maxConcurrentExchanges())
	var own float64
	var found bool
	for _, w := range f.liveWorkers() {
		if v, ok := metric(w.addr, "vaultfleet_token_rotations_lost_total"); ok {
			own, found = own+v, true
		}
	}
	g.note("vaultfleet_token_rotations_lost_total over live workers: %v (exported: %v)", own, found)
	if len(lost) > 0 {
		g.note("rotations lost: %s", summarize(lost))
	}
	if len(falseInv) > 0 {
		var ids []string
		for c := range falseInv {
			ids = append(ids, c+" ("+conns[c].State+"/"+conns[c].Health+" "+conns[c].reason()+")")
		}
		sort.Strings(ids)
		g.note("false invalidations: %s", strings.Join(firstN(ids, 10), ", "))
	}
}

func summarize(m map[string]string) string {
	var ids []string
	for k, v := range m {
		ids = append(ids, k+": "+v)
	}
	sort.Strings(ids)
	return strings.Join(firstN(ids, 10), "; ")
}

func firstN(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("... %d more", len(s)-n))
	}
	return s
}

// waitSteady waits until every consumer is callable (a precondition of a
// scenario, before its fault).
func (f *fleet) waitSteady(consumers []string, d time.Duration) {
	f.t.Helper()
	var last []string
	_, ok := waitFor(d, 300*time.Millisecond, func() bool {
		conns := f.api.byConsumer()
		last = last[:0]
		for _, c := range consumers {
			want := "callable"
			if !f.providerValid(c) {
				want = "invalid"
			}
			if conns[c].State != want {
				last = append(last, c+"="+conns[c].State+"/"+conns[c].Health)
			}
		}
		return len(last) == 0 && conns != nil
	})
	if !ok {
		f.t.Fatalf("precondition: connections did not settle within %s: %s", d, strings.Join(firstN(last, 10), ", "))
	}
}

// onDemandRan counts the consumers whose current verdict was computed at
// or after since (their on-demand validation ran).
func (f *fleet) onDemandRan(consumers []string, since time.Time) int {
	conns := f.api.byConsumer()
	n := 0
	for _, c := range consumers {
		if v, ok := conns[c]; ok && v.Validation != nil && !v.Validation.CheckedAt.Before(since.Truncate(time.Millisecond)) {
			n++
		}
	}
	return n
}
