package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/state"
	"github.com/vaultfleet/vaultfleet/tasks"
)

// refreshLockLease is how long the fleet's refresh lock lives without
// being extended (worker: token timeout 15s + store write 10s + 5s on
// main). VAULTFLEET_FAULTS_LOCK_LEASE overrides it when the fleet's lease
// changes.
func refreshLockLease() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("VAULTFLEET_FAULTS_LOCK_LEASE")); err == nil && d > 0 {
		return d
	}
	return 30 * time.Second
}

// TestKillWorker (1): kill -9 of a worker with checks and refreshes in
// flight. XeroGrace: the provider accepts the previous refresh token for a
// while, so no rotation needs to be lost: an exchange whose answer died
// with the worker can be made again. StrictRotation: those rotations are
// lost for any client; the fleet must say so (reason and health
// rotation_lost, vaultfleet_token_rotations_lost_total), never call them
// revoked, and lose nothing else.
func TestKillWorker(t *testing.T) {
	t.Parallel()
	for _, strict := range []bool{false, true} {
		name := "XeroGrace"
		if strict {
			name = "StrictRotation"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			killWorker(t, strict)
		})
	}
}

func killWorker(t *testing.T, strict bool) {
	f := newFleet(t, fleetOpts{workers: 3})
	f.prov.set(func(p *provider) {
		p.lifetime, p.grace, p.tokenDelay = time.Hour, 5*time.Minute, 8*time.Second
		if strict {
			p.grace = 0
		}
	})
	keys := f.seedKeys(svcKey, "k", pick(20, 60), true)
	od := f.seedKeys(svcOnDemand, "d", pick(10, 30), true)
	f.waitSteady(append(append([]string{}, keys...), od...), 60*time.Second)
	g := &figures{}
	// Only the victim takes work while the refreshes and checks start:
	// the other workers are paused (SIGSTOP) for those seconds.
	victim, others := f.workers[0], f.workers[1:]
	for _, w := range others {
		w.signal(syscall.SIGSTOP)
	}
	// On-demand checks that take 5 s: running when the worker dies.
	f.prov.set(func(p *provider) {
		for _, c := range od {
			p.slowKeys[c] = 5 * time.Second
		}
	})
	oauth := f.seedOAuth(pick(20, 100), -time.Minute)
	postAt := time.Now()
	for _, c := range od {
		if code := f.api.validate(c, svcOnDemand); code != 202 {
			g.fail("POST validate %s: %d", c, code)
		}
	}
	checking := func() int {
		f.prov.mu.Lock()
		defer f.prov.mu.Unlock()
		n := 0
		for _, c := range od {
			if f.prov.keys[f.keysOf[c]].lastCheck.After(postAt) {
				n++
			}
		}
		return n
	}
	// The on-demand checks queue behind the OAuth work (20 at a time, 8 s
	// each): the full form's 100 connections take a few rounds.
	_, ok := waitFor(pick(30*time.Second, 120*time.Second), 20*time.Millisecond, func() bool { return f.prov.inflightTotal() >= 2 && checking() > 0 })
	checks := checking()
	inflightOwners := f.prov.inflightOwners()
	if !ok {
		for _, w := range others {
			w.signal(syscall.SIGCONT)
		}
		t.Fatal("precondition: no token exchange and on-demand check in flight")
	}
	victim.kill9()
	killedAt := time.Now()
	// A request the victim had sent but the provider had not read yet is
	// in flight too: it still rotates, and its answer goes to a dead
	// socket. The others are stopped, so whatever the provider starts
	// answering in the next moments is the victim's.
	time.Sleep(300 * time.Millisecond)
	// So is an answer sent a moment before the kill: the worker may have
	// been reading it, or about to store it (one Redis write, a few
	// milliseconds unless the machine is busy).
	answered := f.prov.answeredSince(killedAt.Add(-answeredWindow))
	for _, c := range append(f.prov.inflightOwners(), answered...) {
		if !slices.Contains(inflightOwners, c) {
			inflightOwners = append(inflightOwners, c)
		}
	}
	inflight := len(inflightOwners)
	for _, w := range others {
		w.signal(syscall.SIGCONT)
	}
	g.note("killed %s, the only worker running, with %d token exchanges in flight or answered in the %s before, and %d of %d on-demand checks in flight",
		victim.name, inflight, answeredWindow, checks, len(od))
	f.startWorker()
	d, ok := waitFor(pick(120*time.Second, 180*time.Second), 500*time.Millisecond, func() bool { return f.onDemandRan(od, postAt) == len(od) })
	ran := f.onDemandRan(od, postAt)
	g.note("on-demand validations run after the kill: %d/%d (last after %s)", ran, len(od), d.Round(100*time.Millisecond))
	if !ok {
		g.tasksLost += len(od) - ran
	}
	consumers := append(append([]string{}, oauth...), keys...)
	name := "1 kill -9 worker (Xero-like grace)"
	var unavoidable []string
	if strict {
		name = "1 kill -9 worker (strict rotation)"
		unavoidable = f.unavoidableLosses(g, inflightOwners, killedAt.Add(8*time.Second+settleTime))
		consumers = slices.DeleteFunc(consumers, func(c string) bool { return slices.Contains(unavoidable, c) })
	}
	f.audit(g, auditOpts{since: killedAt, consumers: consumers, healthOK: true})
	// An exchange whose answer died with the worker can only be made again
	// (the grace makes that succeed; without it, the provider answers
	// invalid_grant): up to one per exchange in flight at the kill is the
	// protocol working, not a duplicate.
	if allow := min(g.dupExchanges, inflight); allow > 0 {
		g.note("%d re-exchange(s) of a rotation whose answer died with the killed worker (allowed: %d exchanges were in flight)", allow, inflight)
		g.dupExchanges -= allow
	}
	if strict {
		// Those the fleet reported as rotation_lost are not losses of the
		// fleet; countLosses counted them.
		g.rotationsLost = max(0, g.rotationsLost-len(unavoidable))
		g.falseInvalid = max(0, g.falseInvalid-len(unavoidable))
	}
	report(t, name, g)
}

// answeredWindow is how long before a kill -9 a token answer may have
// been sent and still have died with the worker, unstored.
const answeredWindow = 2 * time.Second

// unavoidableLosses waits until every OAuth connection whose exchange was
// in flight at the kill and whose rotation died with the worker has a
// verdict, and checks that the fleet calls it what it is: reason and
// health rotation_lost, counted in vaultfleet_token_rotations_lost_total.
// It returns those consumers; any other loss is the fleet's.
func (f *fleet) unavoidableLosses(g *figures, inflightOwners []string, answered time.Time) []string {
	inflight := len(inflightOwners)
	var lost []string
	conns := map[string]connView{}
	// The fleet names such a rotation only once the dead exchange's intent
	// has aged out (token timeout + persist timeout + 30 s, about 135 s:
	// its holder could have been alive and storing), so the wait covers it.
	waitFor(pick(200*time.Second, 240*time.Second), 500*time.Millisecond, func() bool {
		lost = lost[:0]
		conns = f.api.byConsumer()
		settled := true
		for _, c := range inflightOwners {
			// Strict rotation: the answer died with the worker, so the
			// fleet cannot hold the current token of these lineages
			// unless their exchange was answered before the kill.
			rt, err := f.storedRT(c)
			if err != nil || rt == f.prov.current(c) {
				continue
			}
			lost = append(lost, c)
			if conns[c].State != "invalid" {
				settled = false
			}
		}
		// Every answer to an exchange in flight at the kill was sent and had
		// time to be stored: the set of lost rotations is final.
		return settled && conns != nil && time.Now().After(answered)
	})
	reasons := map[string]int{}
	for _, c := range lost {
		v := conns[c]
		reasons[v.State+"/"+v.Health+"/"+v.reason()]++
		if v.reason() != state.ReasonRotationLost || v.Health != string(state.HealthRotationLost) {
			g.fail("%s lost its rotation to the kill but is %s/%s reason %q (want health and reason rotation_lost)", c, v.State, v.Health, v.reason())
		}
	}
	g.note("rotations whose answer died with the killed worker: %d (exchanges in flight: %d), by state/health/reason: %v", len(lost), inflight, reasons)
	var counted float64
	for _, w := range f.liveWorkers() {
		if v, ok := metric(w.addr, "vaultfleet_token_rotations_lost_total"); ok {
			counted += v
		}
	}
	if counted < float64(len(lost)) {
		g.fail("vaultfleet_token_rotations_lost_total counts %v of the %d lost rotations", counted, len(lost))
	}
	return lost
}

// TestRollingRestart (2): SIGTERM of every worker in turn under load,
// each while token exchanges are in flight at a slow token endpoint (7 s,
// longer than the shutdown timeout plus any fixed grace).
func TestRollingRestart(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{workers: 3, shutdownTimeout: time.Second})
	// 12 s: longer than the shutdown timeout plus the worker's fixed 5 s
	// even after the few seconds asynq's heartbeat takes to show who runs
	// the exchange; shorter than the 15 s token timeout.
	f.prov.set(func(p *provider) { p.lifetime, p.tokenDelay = time.Hour, 12*time.Second })
	keys := f.seedKeys(svcKey, "k", pick(15, 50), true)
	f.waitSteady(keys, 60*time.Second)
	g := &figures{}
	var oauth []string
	per := pick(8, 35)
	old := append([]*proc(nil), f.workers...)
	for i, w := range old {
		// A fresh batch of expired tokens, so that exchanges are in flight
		// when this worker is told to stop.
		for j := range per {
			c := consumerID(fmt.Sprintf("o%d", i), j)
			exp := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
			at, rt := f.prov.mint(c, exp)
			f.api.put(c, svcOAuth, map[string]string{"access_token": at, "refresh_token": rt, "expires_at": exp.Format(time.RFC3339)}, nil)
			oauth = append(oauth, c)
		}
		if _, ok := waitFor(30*time.Second, 20*time.Millisecond, func() bool { return f.prov.inflightTotal() >= 2 }); !ok {
			t.Fatal("precondition: no token exchange in flight")
		}
		// Wait until this worker itself runs some of them.
		_, active := f.busiestWorker([]*proc{w})
		infl := f.prov.inflightTotal()
		f.startWorker() // the new pod comes up as the old one terminates
		took, clean := w.stop(60 * time.Second)
		g.note("%s: SIGTERM with %d refresh tasks active on it, %d exchanges in flight fleet-wide; exited in %s (clean=%v)",
			w.name, active, infl, took.Round(100*time.Millisecond), clean)
		if !clean {
			g.fail("%s needed SIGKILL after 60s", w.name)
		}
	}
	end := time.Now()
	f.audit(g, auditOpts{since: end, consumers: append(append([]string{}, oauth...), keys...), healthOK: true})
	report(t, "2 rolling SIGTERM", g)
}

// redisOutage runs scenarios 3 and 4: refreshes writing tokens when
// Redis goes away (stopped, or failed over), on-demand validations queued
// just before it.
func redisOutage(t *testing.T, name string, sentinel bool) {
	f := newFleet(t, fleetOpts{sentinel: sentinel})
	f.prov.set(func(p *provider) { p.lifetime, p.tokenDelay = time.Hour, 3*time.Second })
	keys := f.seedKeys(svcKey, "k", pick(10, 40), true)
	od := f.seedKeys(svcOnDemand, "d", pick(10, 20), true)
	steady := f.seedOAuth(pick(10, 50), time.Hour)
	f.waitSteady(append(append(append([]string{}, keys...), od...), steady...), 60*time.Second)
	g := &figures{}
	if sentinel {
		// README documents redis-sentinel://h:p,h:p/db?master=name; go-redis's
		// ParseFailoverURL (which the fleet calls) wants ?master_name= and
		// further sentinels as &addr=.
		_, err := redis.ParseFailoverURL("redis://" + strings.TrimPrefix(f.sents.documentedURL(), "redis-sentinel://"))
		g.note("README's redis-sentinel:// form accepted: %v (%v); the suite uses %s", err == nil, err, f.sents.url())
	}
	// Refreshes at a slow endpoint: their answers arrive while Redis is away.
	batch := make([]string, 0)
	for j := range pick(15, 60) {
		c := consumerID("b", j)
		exp := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
		at, rt := f.prov.mint(c, exp)
		f.api.put(c, svcOAuth, map[string]string{"access_token": at, "refresh_token": rt, "expires_at": exp.Format(time.RFC3339)}, nil)
		batch = append(batch, c)
	}
	if _, ok := waitFor(30*time.Second, 20*time.Millisecond, func() bool { return f.prov.inflightTotal() >= 3 }); !ok {
		t.Fatal("precondition: no token exchange in flight")
	}
	// Their checks take 2 s, so that the outage begins while they run.
	f.prov.set(func(p *provider) {
		for _, c := range od {
			p.slowKeys[c] = 2 * time.Second
		}
	})
	postAt := time.Now()
	for _, c := range od {
		if code := f.api.validate(c, svcOnDemand); code != 202 {
			g.fail("POST validate %s before the outage: %d", c, code)
		}
	}
	infl := f.prov.inflightTotal()
	var back time.Time
	if sentinel {
		f.sents.waitInSync(t)
		before := f.sents.describe()
		took := f.sents.failover(t)
		back = time.Now()
		g.note("master hung (SIGSTOP) with %d exchanges in flight: replica promoted after %s", infl, took.Round(100*time.Millisecond))
		g.note("before the failover: %s", before)
	} else {
		down := pick(6*time.Second, 20*time.Second)
		f.redis.stop()
		g.note("redis stopped with %d exchanges in flight for %s", infl, down)
		time.Sleep(down) // the outage itself
		f.redis.restart()
		back = time.Now()
	}
	d, ok := waitFor(pick(60*time.Second, 120*time.Second), 500*time.Millisecond, func() bool { return f.onDemandRan(od, postAt) == len(od) })
	ran := f.onDemandRan(od, postAt)
	g.note("on-demand validations enqueued before the outage and run after it: %d/%d, the last %s after Redis was back", ran, len(od), d.Round(100*time.Millisecond))
	if soon := 30 * time.Second; d > soon {
		g.fail("on-demand validations ran %s after Redis was back (want within %s)", d.Round(time.Second), soon)
	}
	if !ok {
		g.tasksLost += len(od) - ran
		_, _, lerr := f.api.list()
		g.note("on-demand checks not run: their tasks %v (listing error: %v)", f.validateTasks(od), lerr)
	}
	all := append(append(append([]string{}, batch...), steady...), keys...)
	f.audit(g, auditOpts{since: back, consumers: all, healthOK: true})
	if sentinel {
		g.note("after the failover: %s", f.sents.describe())
	}
	report(t, name, g)
}

// TestRedisRestart (3): Redis stopped while refreshes are writing tokens,
// then restarted from its AOF.
func TestRedisRestart(t *testing.T) {
	t.Parallel()
	redisOutage(t, "3 redis stopped and restarted from AOF", false)
}

// TestSentinelFailover (4): a Sentinel failover in the middle of refreshes.
func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	redisOutage(t, "4 sentinel failover", true)
}

// TestSlowRedis (5): Redis blocked (DEBUG SLEEP) longer than the refresh
// lock's lease while exchanges are in flight: the lock expires under its
// holder.
func TestSlowRedis(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{workers: 3})
	f.prov.set(func(p *provider) { p.lifetime, p.tokenDelay = time.Hour, 2*time.Second })
	keys := f.seedKeys(svcKey, "k", pick(10, 30), true)
	f.waitSteady(keys, 60*time.Second)
	oauth := f.seedOAuth(pick(20, 60), -time.Minute)
	if _, ok := waitFor(30*time.Second, 20*time.Millisecond, func() bool { return f.prov.inflightTotal() >= 3 }); !ok {
		t.Fatal("precondition: no token exchange in flight")
	}
	g := &figures{}
	sleep := refreshLockLease() + 3*time.Second
	infl := f.prov.inflightTotal()
	done := f.redis.sleep(sleep)
	g.note("DEBUG SLEEP %s (lock lease %s) with %d exchanges in flight", sleep, refreshLockLease(), infl)
	if err := <-done; err != nil {
		g.note("DEBUG SLEEP: %v", err)
	}
	// An exchange whose intent the stall caught before its provider call
	// (BeginExchange sent, its reply lost to the client's timeout) leaves
	// an intent nobody can settle: the fleet waits the intent's maximum
	// age (token timeout + persist timeout + 30 s, 135 s by default)
	// before exchanging that refresh token again, by design. The deadline
	// covers that worst case.
	f.audit(g, auditOpts{since: time.Now(), consumers: append(append([]string{}, oauth...), keys...), healthOK: true,
		deadline: pick(160*time.Second, 180*time.Second)})
	report(t, "5 slow redis", g)
}

// TestProviderOutage (6): 5xx and timeouts on checks and on the token
// endpoint, with long-lived and with 1-minute tokens: no invalidation, one
// refresh chain per connection, health ok again by itself.
func TestProviderOutage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
		outage   time.Duration
	}{
		{"LongLivedTokens", time.Hour, pick(10*time.Second, 90*time.Second)},
		{"OneMinuteTokens", time.Minute, pick(15*time.Second, 90*time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, fleetOpts{lease: pick(5*time.Second, 30*time.Second)})
			f.prov.set(func(p *provider) { p.lifetime, p.hang = tc.lifetime, 30*time.Second })
			keys := f.seedKeys(svcKey, "k", pick(10, 40), true)
			oauth := f.seedOAuth(pick(10, 50), tc.lifetime)
			f.waitSteady(append(append([]string{}, keys...), oauth...), 60*time.Second)
			g := &figures{}
			f.prov.set(func(p *provider) { p.tokenFault, p.checkFault = faultMixed, faultMixed })
			start := time.Now()
			// Tokens that must be refreshed during the outage.
			for j := range pick(10, 50) {
				c := consumerID("x", j)
				exp := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
				at, rt := f.prov.mint(c, exp)
				f.api.put(c, svcOAuth, map[string]string{"access_token": at, "refresh_token": rt, "expires_at": exp.Format(time.RFC3339)}, nil)
				oauth = append(oauth, c)
			}
			maxChains, worst := 0, ""
			for time.Since(start) < tc.outage {
				for k, n := range f.refreshChains() {
					if n > maxChains {
						maxChains, worst = n, k
					}
				}
				time.Sleep(300 * time.Millisecond)
			}
			f.prov.set(func(p *provider) { p.tokenFault, p.checkFault = faultNone, faultNone })
			end := time.Now()
			g.note("outage of %s (5xx and timeouts alternating); most refresh tasks of one connection at once: %d (%s)", tc.outage, maxChains, worst)
			if maxChains > 1 {
				g.fail("%d concurrent refresh chains for one connection (want 1)", maxChains)
			}
			f.audit(g, auditOpts{since: end, consumers: append(append([]string{}, oauth...), keys...), healthOK: true})
			report(t, "6 provider outage, "+tc.name, g)
		})
	}
}

// TestAuthIncident (7): most credentials suddenly 401 while a standing
// population of invalid connections is re-checked: the invalid_wave guard
// holds the wave, and once it passes new genuine invalidations are not
// held back.
func TestAuthIncident(t *testing.T) {
	t.Parallel()
	threshold, window := pick(4, 10), pick(10*time.Second, 30*time.Second)
	f := newFleet(t, fleetOpts{interval: 3 * time.Second, invalidInterval: 3 * time.Second})
	standing := f.seedKeys(svcKey, "s", pick(10, 40), false)
	healthy := f.seedKeys(svcKey, "k", pick(30, 100), true)
	f.waitSteady(append(append([]string{}, standing...), healthy...), 90*time.Second)
	// Turn the guard on (the standing population became invalid without it).
	f.opts.keyWave = fmt.Sprintf("{threshold: %d, window: %s}", threshold, window)
	if err := os.WriteFile(f.catalog, []byte(f.catalogYAML()), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, w := range f.liveWorkers() {
		w.stop(30 * time.Second)
		f.startWorker()
	}
	g := &figures{}
	// The standing population is being re-checked by the guarded workers.
	restarted := time.Now()
	if _, ok := waitFor(30*time.Second, 200*time.Millisecond, func() bool {
		f.prov.mu.Lock()
		defer f.prov.mu.Unlock()
		for _, c := range standing {
			if f.prov.keys[f.keysOf[c]].lastCheck.Before(restarted) {
				return false
			}
		}
		return true
	}); !ok {
		t.Fatal("precondition: the standing invalid population was not re-checked")
	}
	hit := healthy[:len(healthy)*4/5]
	f.prov.set(func(p *provider) {
		for _, c := range hit {
			p.incident[c] = true
		}
	})
	start := time.Now()
	incident := pick(8*time.Second, 30*time.Second)
	time.Sleep(incident) // the incident itself
	f.prov.set(func(p *provider) { p.incident = map[string]bool{} })
	end := time.Now()
	flipped := map[string]bool{}
	for _, e := range f.events() {
		if e.StateAfter == "invalid" && e.StateBefore != "invalid" && e.Time.After(start) && strings.HasPrefix(e.ConsumerID, "k-") {
			flipped[e.ConsumerID] = true
		}
	}
	windows := int(end.Sub(start)/window) + 1
	g.note("auth incident on %d of %d healthy keys for %s beside %d standing invalid: %d flipped (guard: %d per %s, %d window(s))",
		len(hit), len(healthy), incident, len(standing), len(flipped), threshold, window, windows)
	if len(flipped) > threshold*windows {
		g.fail("the guard let %d invalidations through (at most %d)", len(flipped), threshold*windows)
	}
	// Once the wave has passed and a window has gone by, a genuine
	// revocation must turn invalid.
	f.audit(g, auditOpts{since: end, consumers: append(append([]string{}, healthy...), standing...), healthOK: true})
	time.Sleep(window) // let the incident's window close (a positive assertion follows)
	revoked := healthy[len(healthy)-3:]
	for _, c := range revoked {
		f.prov.revokeKey(f.keyOf(c))
	}
	revokedAt := time.Now()
	// A revoked key is checked within one interval (3s) and flips at once
	// (keyco asks no confirmation): allow two intervals and some slack.
	d, ok := waitFor(16*time.Second, 300*time.Millisecond, func() bool {
		conns := f.api.byConsumer()
		for _, c := range revoked {
			if conns[c].State != "invalid" {
				return false
			}
		}
		return true
	})
	conns := f.api.byConsumer()
	held := 0
	for _, c := range revoked {
		if conns[c].State != "invalid" {
			held++
		}
	}
	g.note("genuine revocations after the wave: %d/%d invalid after %s", len(revoked)-held, len(revoked), d.Round(100*time.Millisecond))
	if !ok {
		g.fail("%d genuine invalidations held back %s after the wave passed", held, time.Since(revokedAt).Round(time.Second))
	}
	// The incident's flips are false invalidations the guard budgets for;
	// countLosses counted them: report them apart from the guard's budget.
	if g.falseInvalid > 0 && g.falseInvalid <= threshold*windows && len(flipped) == g.falseInvalid {
		g.note("%d false invalidations within the guard's budget (%d): not counted as losses", g.falseInvalid, threshold*windows)
		g.falseInvalid = 0
	}
	report(t, "7 auth incident", g)
}

// TestWrongClientSecret (8): the fleet's OAuth client secret is wrong: no
// connection flips; the incident is reported (metric and one log line
// naming the integration and the variable).
func TestWrongClientSecret(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{workerSecret: "wrong-client-secret-0123456789"})
	f.prov.set(func(p *provider) { p.lifetime = time.Hour })
	oauth := f.seedOAuth(pick(15, 60), -time.Minute)
	g := &figures{}
	const family = "vaultfleet_oauth_client_errors_total"
	var reported bool
	d, _ := waitFor(30*time.Second, 300*time.Millisecond, func() bool {
		f.prov.mu.Lock()
		n := f.prov.invalidClient
		f.prov.mu.Unlock()
		if n == 0 {
			return false
		}
		for _, w := range f.liveWorkers() {
			if v, ok := metric(w.addr, family, `integration="`+svcOAuth+`"`); ok && v > 0 {
				reported = true
			}
		}
		return reported
	})
	if !reported {
		g.fail("%s{integration=%q} not exported by any worker %s after the first invalid_client", family, svcOAuth, d.Round(time.Second))
	}
	logged := 0
	for _, w := range f.workers {
		for _, l := range strings.Split(w.log(), "\n") {
			if strings.Contains(l, svcOAuth) && strings.Contains(l, envClientSecret) {
				logged++
			}
		}
	}
	g.note("invalid_client answers=%d; log lines naming %s and %s: %d", f.prov.invalidClient, svcOAuth, envClientSecret, logged)
	if logged == 0 {
		g.fail("no log line names the integration and %s", envClientSecret)
	}
	flipped := 0
	for _, e := range f.events() {
		if e.StateAfter == "invalid" {
			flipped++
		}
	}
	g.note("connections flipped to invalid during the incident: %d", flipped)
	// The operator fixes the secret: a rolling restart with the right one.
	f.vars[envClientSecret] = f.prov.clientSecret
	for _, w := range f.liveWorkers() {
		w.stop(30 * time.Second)
		f.startWorker()
	}
	fixed := time.Now()
	f.audit(g, auditOpts{since: fixed, consumers: oauth, healthOK: true})
	report(t, "8 wrong OAuth client secret", g)
}

// TestMisconfiguredConsumers (9): misconfigured consumers (a host that
// does not resolve, a redirect off the allowed hosts, a credential with
// CR/LF) beside healthy ones of the same integration: the healthy ones keep
// being checked and the breaker stays closed.
func TestMisconfiguredConsumers(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{interval: 3 * time.Second})
	healthy := f.seedKeys(svcHost, "h", 3, true)
	f.waitSteady(healthy, 60*time.Second)
	g := &figures{}
	var mis []string
	refused := 0
	n := pick(24, 60)
	for i := range n {
		c := consumerID("m", i)
		var code int
		var body []byte
		switch i % 3 {
		case 0: // a host that does not resolve
			k := f.prov.addKey(c, true)
			code, body = f.api.putStatus(c, svcHost, map[string]string{"api_key": k}, map[string]string{"base": fmt.Sprintf("http://nx%d.faults.invalid", i)})
		case 1: // the provider redirects this account off the allowed hosts
			k := f.prov.addRedirectKey(c)
			code, body = f.api.putStatus(c, svcHost, map[string]string{"api_key": k}, map[string]string{"base": "http://" + f.prov.host()})
		case 2: // a credential that cannot be a header value
			code, body = f.api.putStatus(c, svcHost, map[string]string{"api_key": "key\r\nX-Injected: 1"}, map[string]string{"base": "http://" + f.prov.host()})
		}
		switch {
		case code == 422:
			refused++
		case code/100 == 2:
			mis = append(mis, c)
		default:
			t.Fatalf("PUT %s: %d %s", c, code, body)
		}
	}
	start := time.Now()
	want := pick(6, 15)
	counts := func() []int {
		f.prov.mu.Lock()
		defer f.prov.mu.Unlock()
		var out []int
		for _, c := range healthy {
			out = append(out, f.prov.keys[f.keyOf(c)].checks)
		}
		return out
	}
	base := counts()
	d, ok := waitFor(time.Duration(want)*3*time.Second+pick(30*time.Second, 60*time.Second), 500*time.Millisecond, func() bool {
		for i, n := range counts() {
			if n-base[i] < want {
				return false
			}
		}
		return true
	})
	got := counts()
	for i := range got {
		got[i] -= base[i]
	}
	g.note("%d misconfigured (%d refused at write with 422) beside %d healthy: healthy checks since %v after %s",
		len(mis), refused, len(healthy), got, d.Round(100*time.Millisecond))
	if !ok {
		g.fail("healthy consumers were not checked %d times each within %s: %v", want, time.Since(start).Round(time.Second), got)
	}
	for _, w := range f.liveWorkers() {
		if v, found := metric(w.addr, "vaultfleet_circuit_open", `integration="`+svcHost+`"`); found && v > 0 {
			g.fail("%s: breaker of %s open because of consumers' misconfiguration", w.name, svcHost)
		}
	}
	conns := f.api.byConsumer()
	healths := map[string]int{}
	unclear := 0
	for _, c := range mis {
		v := conns[c]
		healths[v.State+"/"+v.Health]++
		if v.State != "invalid" && v.Health != "misconfigured" && v.Health != "missing_settings" {
			unclear++
		}
	}
	g.note("misconfigured connections by state/health: %v", healths)
	if unclear > 0 {
		g.fail("%d of %d misconfigured connections have no clear verdict or health (want invalid, misconfigured or missing_settings): %v", unclear, len(mis), healths)
	}
	f.audit(g, auditOpts{since: start, consumers: healthy, healthOK: true})
	report(t, "9 misconfigured consumers", g)
}

// TestKeyRotation (10): run with old, then new,old; vaultfleet reseal;
// restart with new only: every record readable, nothing answers 500.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	oldKey, newKey := "old:"+newKey(), "new:"+newKey()
	f := newFleet(t, fleetOpts{keys: oldKey})
	keys := f.seedKeys(svcKey, "k", pick(20, 60), true)
	oauth := f.seedOAuth(pick(10, 30), time.Hour)
	all := append(append([]string{}, keys...), oauth...)
	f.waitSteady(all, 60*time.Second)
	g := &figures{}
	restartAll := func(keys string) {
		f.vars["VAULTFLEET_ENCRYPTION_KEYS"] = keys
		for _, p := range append(append([]*proc{f.serve}, f.workers...), f.schedulers...) {
			p.stop(30 * time.Second)
		}
		f.workers, f.schedulers = nil, nil
		f.serve = f.startServe()
		f.api.base = "http://" + f.serve.addr
		for range f.opts.schedulers {
			f.startScheduler()
		}
		for range f.opts.workers {
			f.startWorker()
		}
	}
	restartAll(newKey + "," + oldKey)
	start := time.Now()
	cmd := exec.Command(binPath, "reseal")
	cmd.Env = f.env(nil)
	out, err := cmd.CombinedOutput()
	g.note("vaultfleet reseal (keys new,old, fleet running): %v in %s; output: %s", err, time.Since(start).Round(100*time.Millisecond), tail(string(out), 400))
	if err != nil {
		g.fail("vaultfleet reseal failed: %v", err)
	}
	restartAll(newKey)
	f.store = f.openStore(t, f.storeCatalog(t), newKey)
	back := time.Now()
	// Every record readable through every read path.
	fails := map[string]int{}
	for _, c := range all {
		svc := svcKey
		if f.prov.lineages[c] != nil {
			svc = svcOAuth
		}
		if code, _, _ := f.api.do("GET", connPath(c, svc), nil); code != 200 {
			fails[fmt.Sprintf("GET one %d", code)]++
		}
		if code, _, _ := f.api.do("GET", "/v1/consumers/"+c+"/connections", nil); code != 200 {
			fails[fmt.Sprintf("GET consumer %d", code)]++
		}
	}
	if _, code, err := f.api.list(); err != nil {
		fails[fmt.Sprintf("GET /v1/connections %d", code)]++
	}
	g.note("reads with the new key only: failures by kind %v", fails)
	if len(fails) > 0 {
		g.fail("records unreadable after the old key was dropped: %v", fails)
	}
	f.audit(g, auditOpts{since: back, consumers: all, healthOK: true})
	report(t, "10 key rotation", g)
}

func (f *fleet) storeCatalog(t *testing.T) *catalog.Catalog {
	cat, err := catalog.Load(f.catalog)
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// TestWebhookOutage (11): a webhook receiver down longer than the event
// stream holds its events: every event is delivered once it is back.
func TestWebhookOutage(t *testing.T) {
	t.Parallel()
	f := newFleet(t, fleetOpts{webhooks: true})
	f.hook.setDown(true)
	keys := f.seedKeys(svcKey, "k", pick(20, 50), true)
	f.waitSteady(keys, 60*time.Second)
	g := &figures{}
	evs := f.events()
	want := map[string]bool{}
	for _, e := range evs {
		want[tasks.IdempotencyKey(e.ID, "faults")] = true
	}
	// Every event was tried at least once while the receiver was down.
	if _, ok := waitFor(60*time.Second, 200*time.Millisecond, func() bool {
		f.hook.mu.Lock()
		defer f.hook.mu.Unlock()
		return f.hook.refused >= len(want)
	}); !ok {
		t.Fatalf("precondition: deliveries were not attempted while the receiver was down")
	}
	// The stream's cap (MAXLEN ~ 100000, no configuration knob) trims the
	// oldest entries once newer ones arrive; do what it does, at once.
	trimmed, err := f.rdb.XTrimMaxLen(context.Background(), "vaultfleet:events", 0).Result()
	if err != nil {
		t.Fatal(err)
	}
	f.hook.setDown(false)
	up := time.Now()
	d, ok := waitFor(pick(90*time.Second, 300*time.Second), 500*time.Millisecond, func() bool {
		f.hook.mu.Lock()
		defer f.hook.mu.Unlock()
		for k := range want {
			if f.hook.deliveries[k] == 0 {
				return false
			}
		}
		return true
	})
	f.hook.mu.Lock()
	delivered := 0
	for k := range want {
		if f.hook.deliveries[k] > 0 {
			delivered++
		}
	}
	f.hook.mu.Unlock()
	g.tasksLost = len(want) - delivered
	g.recovered, g.recover = ok, d
	g.note("%d events while the receiver was down, %d stream entries trimmed; delivered after it came back: %d/%d; archived tasks: %d",
		len(want), trimmed, delivered, len(want), f.archived())
	_ = up
	report(t, "11 webhook receiver down past the stream cap", g)
}
