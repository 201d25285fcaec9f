package state

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redact"
)

// refreshTokenDead reports whether c's verdict for its current revision is
// that its refresh token is dead (refresh_token_revoked, rotation_lost).
func refreshTokenDead(c *Connection) bool {
	v := c.Verdict
	return v != nil && v.Revision == c.Revision && v.Outcome == OutcomeInvalid &&
		(v.Reason == ReasonRefreshTokenRevoked || v.Reason == ReasonRotationLost)
}

// ErrEmptyAccessToken means StoreTokens was given no access token: an empty
// value never overwrites a stored one.
var ErrEmptyAccessToken = errors.New("state: refusing to store an empty access token")

func (s *Store) fleetWrite(ctx context.Context, ref Ref, seen *Connection, fn func(cur *Connection, in *catalog.Integration, now time.Time) (hints, error)) (Change, error) {
	return s.fleetWriteFenced(ctx, ref, seen, nil, fn)
}

func (s *Store) fleetWriteFenced(ctx context.Context, ref Ref, seen *Connection, f *fence, fn func(cur *Connection, in *catalog.Integration, now time.Time) (hints, error)) (Change, error) {
	if err := validateRef(ref); err != nil {
		return Change{}, err
	}
	in, err := s.integration(ref.ConnectionID)
	if err != nil {
		return Change{}, err
	}
	return s.writeFenced(ctx, ref, in, seen, f, func(cur *Connection, now time.Time) (*Connection, hints, error) {
		if cur == nil {
			return nil, hints{}, ErrNotFound
		}
		h, err := fn(cur, in, now)
		return cur, h, err
	})
}

func (s *Store) applyVerdict(ctx context.Context, ref Ref, seen *Connection, rev int64, v Verdict) (Change, error) {
	return s.applyVerdictFenced(ctx, ref, seen, rev, v, nil)
}

func (s *Store) applyVerdictFenced(ctx context.Context, ref Ref, seen *Connection, rev int64, v Verdict, f *fence) (Change, error) {
	if v.Outcome != OutcomeValid && v.Outcome != OutcomeInvalid {
		return Change{}, &FieldError{Field: "verdict.outcome", Msg: `must be "valid" or "invalid"`}
	}
	return s.fleetWriteFenced(ctx, ref, seen, f, verdictMutation(rev, v, f))
}

// verdictMutation is the change ApplyVerdict makes: v for revision rev.
func verdictMutation(rev int64, v Verdict, f *fence) func(c *Connection, in *catalog.Integration, now time.Time) (hints, error) {
	return func(c *Connection, in *catalog.Integration, now time.Time) (hints, error) {
		if c.Revision != rev {
			return hints{}, ErrStale
		}
		if f == nil && refreshTokenDead(c) {
			// The token endpoint said this revision's refresh token is
			// dead (revoked, or a rotation lost): a check, whatever it saw
			// with the last access token, cannot say more. Only new
			// credentials (a new revision) or tokens stored from that
			// lineage change it.
			return hints{noop: true}, nil
		}
		v.Revision = rev
		if v.CheckedAt.IsZero() {
			v.CheckedAt = now
		}
		h := hints{reason: v.Reason, verdict: true}
		h.confirm = foldVerdict(c, in, v, now)
		return h, nil
	}
}

// ApplyVerdictsFrom is ApplyVerdictFrom for many connections (seen[i] gets
// vs[i]), each with its own compare-and-set: the verdicts that change
// nothing but the check's time (the lean write, touch.lua) go to Redis in
// one pipeline; any other, and any whose record moved since it was read,
// is applied on its own as ApplyVerdictFrom does. out[i] and errs[i] are
// seen[i]'s.
func (s *Store) ApplyVerdictsFrom(ctx context.Context, seen []*Connection, vs []Verdict) (out []Change, errs []error) {
	out, errs = make([]Change, len(seen)), make([]error, len(seen))
	type lean struct {
		i   int
		pw  preparedWrite
		cmd *redis.Cmd
	}
	var leans []lean
	pipe := s.cfg.Client.Pipeline()
	for i, c := range seen {
		if c == nil || (vs[i].Outcome != OutcomeValid && vs[i].Outcome != OutcomeInvalid) {
			out[i], errs[i] = s.ApplyVerdictFrom(ctx, c, vs[i])
			continue
		}
		ref := c.Ref()
		in, err := s.integration(ref.ConnectionID)
		if err != nil {
			errs[i] = err
			continue
		}
		fn := verdictMutation(c.Revision, vs[i], nil)
		pw, err := s.prepareWrite(ctx, s.keysOf(ref), ref, in, c, nil, nil, func(cur *Connection, now time.Time) (*Connection, hints, error) {
			h, err := fn(cur, in, now)
			return cur, h, err
		})
		switch {
		case err != nil:
			errs[i] = err
		case pw.noop:
			out[i] = Change{Before: c, After: c}
		case !pw.lean:
			out[i], errs[i] = s.ApplyVerdictFrom(ctx, c, vs[i])
		default:
			leans = append(leans, lean{i: i, pw: pw, cmd: touchScript.EvalSha(ctx, pipe, pw.ks, pw.args...)})
		}
	}
	if len(leans) == 0 {
		return out, errs
	}
	_, _ = pipe.Exec(ctx) // each command's own error is read below
	for _, l := range leans {
		c := seen[l.i]
		res, err := l.cmd.Slice()
		if ok := len(res) > 0 && res[0] == int64(1); err == nil && ok {
			out[l.i] = Change{Before: c, After: l.pw.next}
			continue
		}
		if err != nil && !redis.HasErrorPrefix(err, "NOSCRIPT") {
			errs[l.i] = fmt.Errorf("state: write connection %s: %w", c.Ref(), err)
			continue
		}
		// The script is not loaded yet, or the record moved since it was
		// read: the write on its own reads again (and loads the script).
		out[l.i], errs[l.i] = s.ApplyVerdictFrom(ctx, c, vs[l.i])
	}
	return out, errs
}

// foldVerdict applies v (for c's current revision) to c as ApplyVerdict
// does: a valid verdict clears Confirmation; an invalid one is held in
// Confirmation while the integration's ConfirmInvalid asks for more
// (confirm reports that), and decides otherwise. Transient failures end.
func foldVerdict(c *Connection, in *catalog.Integration, v Verdict, now time.Time) (confirm bool) {
	rev := v.Revision
	c.Transient = Transient{}
	if v.Outcome == OutcomeValid {
		c.Verdict, c.Confirmation = &v, Confirmation{}
		return false
	}
	alreadyInvalid := c.Verdict != nil && c.Verdict.Revision == rev && c.Verdict.Outcome == OutcomeInvalid
	invalids := 0
	if c.Confirmation.Revision == rev {
		invalids = c.Confirmation.Invalids
	}
	if in.ConfirmInvalid > 0 && !alreadyInvalid && invalids < in.ConfirmInvalid {
		if invalids == 0 {
			c.Confirmation = Confirmation{Revision: rev, FirstAt: now}
		}
		c.Confirmation.Invalids = invalids + 1
		c.Confirmation.Reason, c.Confirmation.Status = v.Reason, v.HTTPStatus
		return true
	}
	c.Verdict, c.Confirmation = &v, Confirmation{}
	return false
}

// WouldInvalidate reports whether applying the invalid verdict v to c, as
// ApplyVerdict would (the integration's confirmation included), changes
// c's state to invalid: c is not invalid now and would be after. A
// confirmation step that does not flip yet, a connection already invalid,
// a valid verdict and a verdict for another revision (v.Revision 0 means
// c's) all report false. It is pure: c is not modified. The invalid-wave
// guard counts only verdicts for which it is true.
func WouldInvalidate(c *Connection, in *catalog.Integration, v Verdict, now time.Time) bool {
	if c == nil || in == nil || v.Outcome != OutcomeInvalid {
		return false
	}
	if v.Revision == 0 {
		v.Revision = c.Revision
	}
	if v.Revision != c.Revision {
		return false
	}
	if before, _ := Derive(c, in, now); before == Invalid {
		return false
	}
	next := c.clone()
	foldVerdict(next, in, v, now)
	after, _ := Derive(next, in, now)
	return after == Invalid
}

func (s *Store) recordTransient(ctx context.Context, ref Ref, rev int64, msg string, misconfigured bool) (Change, error) {
	msg = redact.Truncate(msg, maxErrorLen)
	return s.fleetWrite(ctx, ref, nil, func(c *Connection, _ *catalog.Integration, now time.Time) (hints, error) {
		if c.Revision != rev {
			return hints{}, ErrStale
		}
		c.Transient.Failures++
		c.Transient.LastError, c.Transient.LastAt = msg, now
		c.Transient.Misconfigured = misconfigured
		return hints{reason: msg}, nil
	})
}

func (s *Store) storeTokens(ctx context.Context, ref Ref, used string, t Tokens, f *fence) (Change, error) {
	if t.AccessToken == "" {
		return Change{}, ErrEmptyAccessToken
	}
	return s.fleetWriteFenced(ctx, ref, nil, f, func(c *Connection, in *catalog.Integration, now time.Time) (hints, error) {
		if f != nil && c.Credentials.AccessToken == t.AccessToken &&
			(t.RefreshToken == "" || c.Credentials.RefreshToken == t.RefreshToken) {
			// Our own earlier attempt was applied (its replica
			// acknowledgement was missing): stored already.
			return hints{noop: true}, nil
		}
		if c.Credentials.RefreshToken != used {
			return hints{}, ErrStale
		}
		// Tokens obtained with this lineage prove it was alive: a
		// revocation verdict about the same lineage (a race that the
		// fence now prevents, or a lost rotation that recovered) is void.
		if v := c.Verdict; v != nil && v.Outcome == OutcomeInvalid && v.Lineage != "" && v.Lineage == Lineage(used) {
			c.Verdict = nil
		}
		c.Credentials.AccessToken = t.AccessToken
		if t.RefreshToken != "" {
			c.Credentials.RefreshToken = t.RefreshToken
		}
		c.Credentials.ExpiresAt = time.Time{}
		if !t.ExpiresAt.IsZero() {
			c.Credentials.ExpiresAt = t.ExpiresAt.UTC()
		}
		c.Credentials.IssuedAt = now
		if !t.IssuedAt.IsZero() {
			c.Credentials.IssuedAt = t.IssuedAt.UTC()
		}
		defaultExpiry(&c.Credentials, in)
		c.Refresh = RefreshStatus{RefreshedAt: now}
		return hints{reason: EventReasonTokenRefreshed}, nil
	})
}

func (s *Store) recordRefreshFailure(ctx context.Context, ref Ref, used string, msg string) (Change, error) {
	msg = redact.Truncate(msg, maxErrorLen)
	return s.fleetWrite(ctx, ref, nil, func(c *Connection, _ *catalog.Integration, now time.Time) (hints, error) {
		if c.Credentials.RefreshToken != used {
			return hints{}, ErrStale
		}
		c.Refresh.Failures++
		c.Refresh.LastError, c.Refresh.LastAt = msg, now
		return hints{reason: msg}, nil
	})
}

// Reseal seals a connection's credentials again under the keyring's
// primary key if another key sealed them, so that the old key can leave
// the keyring after a rotation. It reports whether it rewrote them. The
// write compares and sets on the version like every other (a concurrent
// write wins and the reseal looks again); it bumps the version but makes
// no event of its own. A record whose credentials cannot be opened gives
// an error wrapping ErrUnreadable.
func (s *Store) Reseal(ctx context.Context, ref Ref) (bool, error) {
	if err := validateRef(ref); err != nil {
		return false, err
	}
	// A connection whose integration left the catalog is resealed too.
	in, _ := s.integration(ref.ConnectionID)
	primary := s.cfg.Keys.PrimaryID()
	var resealed bool
	_, err := s.write(ctx, ref, in, nil, func(cur *Connection, _ time.Time) (*Connection, hints, error) {
		resealed = cur != nil && cur.CredentialsKeyID != "" && (cur.CredentialsKeyID != primary || cur.Unreadable)
		if !resealed {
			return cur, hints{noop: true}, nil
		}
		return cur, hints{reseal: true}, nil
	})
	if err != nil {
		return false, fmt.Errorf("state: reseal: %w", err)
	}
	return resealed, nil
}
