package state

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/internal/retry"
)

// The refresh fence: the one mechanism that keeps a rotated refresh token
// from being lost or a connection from being revoked by a race. It has two
// parts, both under the connection's hash tag so that the write script can
// check them in the same atomic step as the write they guard:
//
//	<prefix>:{sNN}:rlock:<member>    string: the lease token of the holder
//	<prefix>:{sNN}:rintent:<member>  hash: o (owner's lease token), l (lineage
//	                                 of the refresh token being exchanged),
//	                                 t (Redis TIME, ms), s (i in flight, u unknown)
//
// The lease says who may start an exchange; the intent says which exchange
// of which refresh-token lineage is in flight, and survives the lease: a
// holder whose lease lapsed (slow Redis) can still persist the tokens of
// the exchange it started, and nobody else exchanges that lineage while the
// intent is younger than its TTL.

// The fence's scripts (see each file for its keys and replies).
var (
	//go:embed lua/fence_begin.lua
	fenceBeginLua string
	//go:embed lua/fence_extend.lua
	fenceExtendLua string
	//go:embed lua/fence_release.lua
	fenceReleaseLua string
	//go:embed lua/fence_settle.lua
	fenceSettleLua string
	//go:embed lua/fence_abandon.lua
	fenceAbandonLua string

	fenceBeginScript = redis.NewScript(fenceBeginLua)
	fenceExtend      = redis.NewScript(fenceExtendLua)
	fenceRelease     = redis.NewScript(fenceReleaseLua)
	fenceSettle      = redis.NewScript(fenceSettleLua)
)

// abandonTimeout bounds the attempts to abandon an exchange whose intent's
// reply was lost: long enough for a stall such as a Sentinel failover or
// a long DEBUG SLEEP (an outage that outlasts it lost the stalled command
// too, unless Redis kept it; the intent then ages out).
const abandonTimeout = 45 * time.Second

// intentRetention keeps an unknown-outcome intent long enough to explain
// an invalid_grant at the next refresh of that lineage.
const intentRetention = 7 * 24 * time.Hour

// ErrRefreshLocked means another holder has the connection's refresh lease.
var ErrRefreshLocked = errors.New("state: refresh lease held elsewhere")

// ErrExchangeInFlight means another holder's exchange of this connection's
// refresh token may still be persisting its result: no new exchange may
// start until it settles or its intent ages out.
var ErrExchangeInFlight = errors.New("state: another token exchange may still be persisting")

// ErrNotReplicated means a fenced write was applied on the master but not
// acknowledged by Config.AckReplicas replicas in time: it may still be
// lost in a failover, so the caller writes again (the write is
// idempotent: tokens already stored read as stored).
var ErrNotReplicated = errors.New("state: write not acknowledged by enough replicas")

// ErrFenced means a fenced write was refused because its lease or intent
// is no longer the caller's: somebody else owns the refresh now.
var ErrFenced = errors.New("state: refresh fence lost")

// Lineage names a refresh token without revealing it: the first 12 hex
// digits of its SHA-256. It marks which exchange an intent or a revocation
// verdict is about.
func Lineage(refreshToken string) string {
	if refreshToken == "" {
		return ""
	}
	h := sha256.Sum256([]byte(refreshToken))
	return hex.EncodeToString(h[:6])
}

// RefreshLease is a held refresh lease of one connection.
type RefreshLease struct {
	ref    Ref
	token  string
	lock   string
	intent string
}

// Token is the lease's unique value (for logs: it is no secret).
func (l *RefreshLease) Token() string { return l.token }

// Prior describes the intent found when an exchange began.
type Prior struct {
	// Lineage of the refresh token a previous exchange used, if an intent
	// was left behind whose outcome is unknown.
	Lineage string
	// Unknown: that exchange may have reached the provider and rotated
	// the token without the fleet learning the answer.
	Unknown bool
}

func (s *Store) fenceKeys(ref Ref) (lock, intent string) {
	k := s.keysOf(ref)
	m := ref.String()
	return k.tag + "rlock:" + m, k.tag + "rintent:" + m
}

// AcquireRefresh takes the connection's refresh lease for ttl, or returns
// ErrRefreshLocked.
func (s *Store) AcquireRefresh(ctx context.Context, ref Ref, ttl time.Duration) (*RefreshLease, error) {
	if err := validateRef(ref); err != nil {
		return nil, err
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	l := &RefreshLease{ref: ref, token: hex.EncodeToString(b)}
	l.lock, l.intent = s.fenceKeys(ref)
	ok, err := s.cfg.Client.SetNX(ctx, l.lock, l.token, ttl).Result()
	switch {
	case err != nil:
		return nil, fmt.Errorf("state: refresh lease %s: %w", ref, err)
	case !ok:
		return nil, ErrRefreshLocked
	}
	return l, nil
}

// RefreshLocked reports whether anybody holds the connection's lease.
func (s *Store) RefreshLocked(ctx context.Context, ref Ref) (bool, error) {
	lock, _ := s.fenceKeys(ref)
	n, err := s.cfg.Client.Exists(ctx, lock).Result()
	if err != nil {
		return false, fmt.Errorf("state: refresh lease %s: %w", ref, err)
	}
	return n > 0, nil
}

// ExtendRefresh extends the lease to ttl from now; ErrFenced if it is no
// longer ours.
func (s *Store) ExtendRefresh(ctx context.Context, l *RefreshLease, ttl time.Duration) error {
	n, err := fenceExtend.Run(ctx, s.cfg.Client, []string{l.lock}, l.token, ttl.Milliseconds()).Int()
	switch {
	case err != nil:
		return fmt.Errorf("state: extend refresh lease %s: %w", l.ref, err)
	case n == 0:
		return ErrFenced
	}
	return nil
}

// ReleaseRefresh gives the lease up if it is still ours.
func (s *Store) ReleaseRefresh(ctx context.Context, l *RefreshLease) error {
	if err := fenceRelease.Run(ctx, s.cfg.Client, []string{l.lock}, l.token).Err(); err != nil {
		return fmt.Errorf("state: release refresh lease %s: %w", l.ref, err)
	}
	return nil
}

// BeginExchange records, under the lease, the intent to exchange the
// refresh token of the given lineage, before the provider is called. It
// returns what a previous exchange left behind, or ErrExchangeInFlight if
// another holder's intent is younger than maxAge, or ErrFenced if the
// lease is no longer ours. maxAge must exceed the longest time a holder
// spends exchanging and persisting (token timeout plus persist timeout).
func (s *Store) BeginExchange(ctx context.Context, l *RefreshLease, lineage string, maxAge time.Duration) (Prior, error) {
	ks := []string{l.lock, l.intent}
	args := []any{l.token, lineage, maxAge.Milliseconds(), intentRetention.Milliseconds()}
	res, acked, err := s.evalAcked(ctx, fenceBeginScript, ks, args, func(p redis.Pipeliner) *redis.Cmd {
		return p.Eval(ctx, fenceBeginLua, ks, args...)
	})
	if err != nil {
		if !ReplyError(err) {
			// No reply (a timeout, a cancelled call, a dropped
			// connection): the script may still run when a stalled Redis
			// wakes, recording an intent nobody would settle, which holds
			// every exchange of this connection back until it ages out.
			s.abandonExchange(ctx, l)
		}
		return Prior{}, fmt.Errorf("state: record exchange intent %s: %w", l.ref, err)
	}
	code, _ := res[0].(int64)
	switch code {
	case -1:
		return Prior{}, ErrFenced
	case 0:
		return Prior{}, ErrExchangeInFlight
	}
	var p Prior
	if len(res) > 2 {
		p.Lineage, _ = res[1].(string)
		st, _ := res[2].(string)
		p.Unknown = st == "unknown" && p.Lineage != ""
	}
	if !acked {
		// An intent only the master holds is forgotten by a failover now,
		// and another worker could then exchange the same refresh token:
		// the provider is not called, and the caller retries. The intent
		// is settled as what it replaced: cleared (nothing was sent), or
		// still unknown if an earlier exchange of this lineage was.
		_ = s.SettleExchange(ctx, l, !(p.Unknown && p.Lineage == lineage))
		return Prior{}, fmt.Errorf("%w: exchange intent of %s", ErrNotReplicated, l.ref)
	}
	return p, nil
}

// abandonExchange runs fence_abandon.lua for l, detached from ctx's
// cancellation (a task whose lease lapsed in the stall still abandons its
// exchange), until Redis answers or abandonTimeout passes: while Redis is
// stalled even a new connection's handshake goes unanswered, so one try
// would be lost. The script is atomic, so it may run before or after the
// stalled BeginExchange. It is sent as EVAL, with its source, so that a
// server whose script cache is empty runs it too.
func (s *Store) abandonExchange(ctx context.Context, l *RefreshLease) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abandonTimeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		if s.cfg.Client.Eval(actx, fenceAbandonLua, []string{l.lock, l.intent}, l.token).Err() == nil {
			return
		}
		if retry.Sleep(actx, retry.Exp(attempt, 100*time.Millisecond, time.Second)) != nil {
			return
		}
	}
}

// SettleExchange ends an intent the lease owns without a store write:
// known clears it (the provider answered and did not rotate), !known marks
// its outcome unknown (the request may have reached the provider).
func (s *Store) SettleExchange(ctx context.Context, l *RefreshLease, known bool) error {
	mode := "u"
	if known {
		mode = "c"
	}
	if err := fenceSettle.Run(ctx, s.cfg.Client, []string{l.intent}, l.token, mode).Err(); err != nil {
		return fmt.Errorf("state: settle exchange intent %s: %w", l.ref, err)
	}
	return nil
}

// Intent reads the connection's exchange intent, for tests and operators.
func (s *Store) Intent(ctx context.Context, ref Ref) (owner, lineage, status string, at time.Time, err error) {
	_, key := s.fenceKeys(ref)
	v, err := s.cfg.Client.HMGet(ctx, key, "o", "l", "s", "t").Result()
	if err != nil {
		return "", "", "", time.Time{}, err
	}
	str := func(x any) string { s, _ := x.(string); return s }
	ms, _ := strconv.ParseInt(str(v[3]), 10, 64)
	return str(v[0]), str(v[1]), str(v[2]), fromMS(ms), nil
}

// fence says which fence a write must still hold (nil: none).
type fence struct {
	lease *RefreshLease
	// needLock: the lease itself must still be ours (a revocation), not
	// only the intent (persisting the tokens of our own exchange).
	needLock bool
}

// Ref is the connection the lease is for.
func (l *RefreshLease) Ref() Ref { return l.ref }
