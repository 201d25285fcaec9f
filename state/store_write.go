package state

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/vaultfleet/vaultfleet/catalog"
	"github.com/vaultfleet/vaultfleet/internal/redact"
	"github.com/vaultfleet/vaultfleet/internal/retry"
)

//go:embed lua/write.lua
var writeLua string

var writeScript = redis.NewScript(writeLua)

// ErrEmptyAccessToken means StoreTokens was given no access token: an empty
// value never overwrites a stored one.
var ErrEmptyAccessToken = errors.New("state: refusing to store an empty access token")

// Reasons the store puts on events it derives from consumer-side and
// token writes (verdict events carry the verdict's reason).
const (
	ReasonCreated            = "created"
	ReasonDeleted            = "deleted"
	ReasonCredentialsChanged = "credentials_changed"
	ReasonSettingsChanged    = "settings_changed"
	ReasonEnabled            = "enabled"
	ReasonDisabled           = "disabled"
	ReasonMetadataChanged    = "metadata_changed"
	ReasonTokenRefreshed     = "token_refreshed"
)

// hints tell the write machinery what kind of change a mutation made, for
// the events and due times it derives.
type hints struct {
	// reason goes on the events of this write.
	reason string
	// consumer: a consumer-side change of credentials, settings or enabled.
	consumer bool
	// verdict: ApplyVerdict; a state change reschedules the check at the
	// interval of the new state.
	verdict bool
	// confirm: an invalid result held for confirmation; the next check is
	// due after the integration's ConfirmSpacing.
	confirm bool
	// noop: nothing changed, write nothing.
	noop bool
	// reseal: seal the credentials again (under the primary key) even
	// though they did not change.
	reseal bool
	// replaceCreds: the mutation sets the credentials in full without
	// reading the stored ones, so it may run on a record whose
	// credentials cannot be opened (Unreadable).
	replaceCreds bool
}

// mutation builds the next connection from the current one (nil when there
// is no record; a private copy the function may change). It returns nil to
// delete, or an error that ends the write without writing.
type mutation func(cur *Connection, now time.Time) (*Connection, hints, error)

// write runs one optimistic read-modify-write: read the record, apply fn,
// derive state and health, events and due times, and write record, indexes,
// counts and events in one Lua call that compares and sets the version. A
// concurrent write of the same connection makes it read again and retry.
func (s *Store) write(ctx context.Context, ref Ref, in *catalog.Integration, seen *Connection, fn mutation) (Change, error) {
	return s.writeFenced(ctx, ref, in, seen, nil, fn)
}

// writeFenced is write under a refresh fence (nil: none): the script
// refuses the write with ErrFenced, never retried, once the fence is no
// longer the caller's.
func (s *Store) writeFenced(ctx context.Context, ref Ref, in *catalog.Integration, seen *Connection, f *fence, fn mutation) (Change, error) {
	k := s.keysOf(ref)
	for attempt := range maxAttempts {
		if attempt > 0 {
			if err := backoff(ctx, attempt); err != nil {
				return Change{}, err
			}
		}
		var cur *Connection
		var err, unreadable error
		if attempt == 0 && seen != nil {
			// The caller's copy saves a read; if the record moved since,
			// the script's version check refuses the write and the next
			// attempt reads it.
			cur = seen.clone()
		} else if cur, err = s.read(ctx, ref); err != nil {
			var ue *UnreadableError
			if !errors.As(err, &ue) {
				return Change{}, err
			}
			// Credentials that cannot be opened: only a delete or a full
			// replacement of the credentials may go on (checked below).
			cur, unreadable = ue.Connection, err
		}
		now := s.now()
		next, h, err := fn(cur.clone(), now)
		if err != nil {
			return Change{}, err
		}
		if unreadable != nil && next != nil && !h.replaceCreds {
			return Change{}, unreadable
		}
		if h.noop {
			if f != nil && !s.acked(ctx) {
				// Stored by our own earlier attempt, but on a master
				// whose replicas have not confirmed it (maybe one about to
				// be demoted): not stored yet as far as a failover goes.
				return Change{}, fmt.Errorf("%w: %s (%d needed)", ErrNotReplicated, ref, s.cfg.AckReplicas)
			}
			return Change{Before: cur, After: cur}, nil
		}
		if next != nil {
			s.finish(cur, next, in, ref, now)
		}
		events := s.deriveEvents(cur, next, h, now)

		ks, args, err := s.scriptArgs(k, ref, in, cur, next, h, events, now, f)
		if err != nil {
			return Change{}, err
		}
		res, acked, err := s.runWrite(ctx, f, ks, args)
		if err != nil {
			return Change{}, fmt.Errorf("state: write connection %s: %w", ref, err)
		}
		if len(res) == 0 {
			return Change{}, fmt.Errorf("state: write connection %s: empty reply", ref)
		}
		if ok, _ := res[0].(int64); ok == -1 {
			return Change{}, fmt.Errorf("%w: %s", ErrFenced, ref)
		} else if ok == 1 && !acked {
			return Change{}, fmt.Errorf("%w: %s (%d needed)", ErrNotReplicated, ref, s.cfg.AckReplicas)
		} else if ok != 1 {
			s.cfg.Logger.DebugContext(ctx, "state: write conflict, retrying",
				slog.String("connection", ref.String()), slog.Int("attempt", attempt+1))
			continue
		}
		if s.cluster {
			s.appendEvents(ctx, events)
		} else {
			for i := range events {
				if i+1 < len(res) {
					events[i].ID, _ = res[i+1].(string)
				}
			}
		}
		return Change{Before: cur, After: next, Events: events}, nil
	}
	return Change{}, fmt.Errorf("%w: %s after %d attempts", ErrContention, ref, maxAttempts)
}

// runWrite runs write.lua. A fenced write (refreshed tokens, a
// revocation) with Config.AckReplicas > 0 is followed by WAIT on the same
// connection; acked reports whether enough replicas confirmed it.
func (s *Store) runWrite(ctx context.Context, f *fence, ks []string, args []any) (res []any, acked bool, err error) {
	if f == nil || s.cfg.AckReplicas <= 0 || s.cluster {
		res, err = writeScript.Run(ctx, s.cfg.Client, ks, args...).Slice()
		return res, true, err
	}
	timeout := s.cfg.AckTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	pipe := s.cfg.Client.Pipeline()
	ev := pipe.Eval(ctx, writeLua, ks, args...)
	wait := pipe.Do(ctx, "wait", s.cfg.AckReplicas, timeout.Milliseconds())
	if _, err := pipe.Exec(ctx); err != nil && ev.Err() != nil {
		return nil, false, ev.Err()
	}
	if res, err = ev.Slice(); err != nil {
		return nil, false, err
	}
	n, err := wait.Int64()
	return res, err == nil && n >= int64(s.cfg.AckReplicas), nil
}

// acked reports whether Config.AckReplicas replicas have caught up with
// the master this client now talks to (true when none are asked for).
func (s *Store) acked(ctx context.Context) bool {
	if s.cfg.AckReplicas <= 0 || s.cluster {
		return true
	}
	timeout := s.cfg.AckTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	n, err := s.cfg.Client.Do(ctx, "wait", s.cfg.AckReplicas, timeout.Milliseconds()).Int64()
	return err == nil && n >= int64(s.cfg.AckReplicas)
}

// scriptArgs lays out the keys and arguments of write.lua (documented
// there) for the change from cur to next (nil: delete).
func (s *Store) scriptArgs(k keys, ref Ref, in *catalog.Integration, cur, next *Connection, h hints,
	events []Event, now time.Time, f *fence) ([]string, []any, error) {
	member := ref.String()
	recKey := k.record(member)
	lock, intent := s.fenceKeys(ref)
	ks := []string{recKey, k.all(), "", "", "", k.counts(), k.due(IndexCheck), k.due(IndexRefresh), lock, intent}
	args := make([]any, 0, 16+len(events)*25)
	expected := "0"
	if cur != nil {
		expected = strconv.FormatInt(cur.Version, 10)
	}
	if next == nil {
		ks[2], ks[3], ks[4] = k.service(cur.ServiceID), k.state(cur.State), k.state(cur.State)
		args = append(args, expected, "d", member, "", "", string(cur.State), cur.ServiceID, "", "k", "",
			dueRemove, 0, dueRemove, 0)
	} else {
		oldState := ""
		ks[2], ks[3], ks[4] = k.service(next.ServiceID), k.state(next.State), k.state(next.State)
		if cur != nil {
			oldState = string(cur.State)
			ks[3] = k.state(cur.State)
		}
		data, err := encodeData(next)
		if err != nil {
			return nil, nil, fmt.Errorf("state: connection %s: encode: %v", ref, err)
		}
		credMode, sealed := "k", []byte(nil)
		if cur == nil || h.reseal || cur.Unreadable || !sameCredentials(cur.Credentials, next.Credentials) {
			// An unreadable value is always replaced or dropped: the
			// mutation set the credentials in full.
			next.Unreadable = false
			switch {
			case next.Credentials.hasAny():
				if sealed, err = sealCreds(s.cfg.Keys, recKey, next.Credentials); err != nil {
					return nil, nil, fmt.Errorf("state: connection %s: encode credentials", ref)
				}
				credMode, next.CredentialsKeyID = "s", s.cfg.Keys.PrimaryID()
			case cur != nil:
				credMode, next.CredentialsKeyID = "d", ""
			}
		}
		checkMode, checkAt := s.dueCheck(cur, next, in, h, now)
		refreshMode, refreshAt := s.dueRefresh(cur, next, in)
		args = append(args, expected, "s", member, strconv.FormatInt(next.Version, 10), string(next.State),
			oldState, next.ServiceID, data, credMode, sealed,
			checkMode, ms(checkAt), refreshMode, ms(refreshAt))
	}
	args = append(args, s.cfg.EventMaxLen, len(events))
	switch {
	case f == nil:
		args = append(args, "", "", "")
	case f.needLock:
		args = append(args, "L", f.lease.token, "1")
	default:
		args = append(args, "I", f.lease.token, "1")
	}
	if !s.cluster && len(events) > 0 {
		ks = append(ks, s.cfg.EventStream)
	}
	for _, e := range events {
		f := eventFields(e)
		args = append(args, len(f))
		for _, v := range f {
			args = append(args, v)
		}
	}
	return ks, args, nil
}

// backoff sleeps a random time that grows with the attempt (at most 10ms).
func backoff(ctx context.Context, attempt int) error {
	const floor = 50 * time.Microsecond
	return retry.Sleep(ctx, retry.Between(floor, floor+retry.Exp(attempt, 100*time.Microsecond, 10*time.Millisecond)))
}

// finish fills what every write sets: identity, version, times, and the
// derived state and health.
func (s *Store) finish(cur, next *Connection, in *catalog.Integration, ref Ref, now time.Time) {
	next.ID, next.ConsumerID = ref.ConnectionID, ref.ConsumerID
	next.UnifiedAPI, next.ServiceID, _ = SplitConnectionID(ref.ConnectionID)
	next.UpdatedAt = now
	if cur == nil {
		// Version and revision start at the creation time in unix ms, not
		// at 1: a connection deleted and added again never repeats a
		// version or revision of its predecessor, so neither an If-Match
		// nor a verdict computed for the old record applies to the new one.
		initial := max(now.UnixMilli(), 1)
		next.Version, next.Revision, next.CreatedAt = initial, initial, now
	} else {
		next.Version = cur.Version + 1
	}
	if in != nil {
		next.State, next.Health = Derive(next, in, now)
	}
}

// refreshTokenDead reports whether c's verdict for its current revision is
// that its refresh token is dead (refresh_token_revoked, rotation_lost).
func refreshTokenDead(c *Connection) bool {
	v := c.Verdict
	return v != nil && v.Revision == c.Revision && v.Outcome == InvalidCred &&
		(v.Reason == ReasonRefreshTokenRevoked || v.Reason == ReasonRotationLost)
}

// sameCredentials compares credentials including IssuedAt (Equal leaves
// it out: it does not make credentials different, but it is stored).
func sameCredentials(a, b Credentials) bool { return a.Equal(b) && a.IssuedAt.Equal(b.IssuedAt) }

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
	return retry.Up(d, 0.1)
}

// integration resolves the catalog entry of a connection id.
func (s *Store) integration(connectionID string) (*catalog.Integration, error) {
	api, svc, ok := SplitConnectionID(connectionID)
	if !ok {
		return nil, fmt.Errorf("state: connection %s: %w", connectionID, catalog.ErrUnknownIntegration)
	}
	in, err := s.cfg.Catalog.Lookup(api, svc)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return in, nil
}

// --- consumer-side writes ---

type writeMode int

const (
	modePut writeMode = iota
	modePatch
	modeCreate
)

// Create adds a connection that must not exist yet (ErrExists otherwise),
// with the same validation as Put.
func (s *Store) Create(ctx context.Context, ref Ref, in Input) (Change, error) {
	return s.consumerWrite(ctx, ref, in, 0, modeCreate)
}

// SetEnabled enables or disables a connection (ErrNotFound if absent).
func (s *Store) SetEnabled(ctx context.Context, ref Ref, enabled bool, ifVersion int64) (Change, error) {
	return s.Patch(ctx, ref, Input{Enabled: &enabled}, ifVersion)
}

func (s *Store) consumerWrite(ctx context.Context, ref Ref, in Input, ifVersion int64, mode writeMode) (Change, error) {
	if err := validateRef(ref); err != nil {
		return Change{}, err
	}
	integ, err := s.integration(ref.ConnectionID)
	if err != nil {
		return Change{}, err
	}
	if err := validateCredentialFields(integ, in.Credentials); err != nil {
		return Change{}, err
	}
	meta, err := checkMetadata(in.Metadata)
	if err != nil {
		return Change{}, err
	}
	if in.Settings != nil && mode != modePatch {
		if err := validateSettings(integ, ref, nonEmpty(in.Settings)); err != nil {
			return Change{}, err
		}
	}
	return s.write(ctx, ref, integ, nil, func(cur *Connection, now time.Time) (*Connection, hints, error) {
		switch {
		case mode == modeCreate && cur != nil:
			return nil, hints{}, ErrExists
		case cur == nil && mode == modePatch:
			return nil, hints{}, ErrNotFound
		case ifVersion > 0 && (cur == nil || cur.Version != ifVersion):
			return nil, hints{}, ErrVersionConflict
		}
		next := cur.clone() // cur stays as read, for the comparisons below
		if next == nil {
			next = &Connection{Enabled: true}
		}
		if in.Credentials != nil {
			var creds Credentials
			if mode == modePatch {
				creds = next.Credentials
			}
			for _, f := range slices.Sorted(maps.Keys(in.Credentials)) {
				if err := creds.Set(f, in.Credentials[f]); err != nil {
					return nil, hints{}, err
				}
			}
			if len(creds.Extra) == 0 {
				creds.Extra = nil
			}
			switch {
			case creds.AccessToken == "":
				creds.IssuedAt = time.Time{}
			case creds.AccessToken != next.Credentials.AccessToken:
				creds.IssuedAt = now
			default:
				creds.IssuedAt = next.Credentials.IssuedAt
			}
			defaultExpiry(&creds, integ)
			next.Credentials = creds
			next.GrantedScopes = nil
			if in.GrantedScopes != nil {
				next.GrantedScopes = append([]string{}, in.GrantedScopes...)
			}
		}
		if in.Settings != nil {
			settings := map[string]string{}
			if mode == modePatch {
				maps.Copy(settings, next.Settings)
			}
			for k, v := range in.Settings {
				if v == "" {
					delete(settings, k)
				} else {
					settings[k] = v
				}
			}
			if mode == modePatch {
				if err := validateSettings(integ, ref, settings); err != nil {
					return nil, hints{}, err
				}
			}
			if len(settings) == 0 {
				settings = nil
			}
			next.Settings = settings
		}
		if in.Enabled != nil {
			next.Enabled = *in.Enabled
		}
		if in.Metadata != nil {
			next.Metadata = meta
		}
		h := hints{consumer: true, replaceCreds: in.Credentials != nil && mode != modePatch}
		if cur == nil {
			h.reason = ReasonCreated
			return next, h, nil
		}
		// Credentials replaced over unreadable ones count as changed: the
		// old verdicts cannot be said to apply to them. So do other granted
		// scopes.
		credsChanged := cur.Unreadable && h.replaceCreds || !cur.Credentials.Equal(next.Credentials) ||
			!slices.Equal(cur.GrantedScopes, next.GrantedScopes) || (cur.GrantedScopes == nil) != (next.GrantedScopes == nil)
		settingsChanged, checkSettingChanged := false, false
		for k := range cur.Settings {
			if cur.Settings[k] != next.Settings[k] {
				settingsChanged = true
				checkSettingChanged = checkSettingChanged || integ.SettingAffectsCheck(k)
			}
		}
		for k := range next.Settings {
			if _, had := cur.Settings[k]; !had {
				settingsChanged = true
				checkSettingChanged = checkSettingChanged || integ.SettingAffectsCheck(k)
			}
		}
		switch {
		case credsChanged:
			h.reason = ReasonCredentialsChanged
		case settingsChanged:
			h.reason = ReasonSettingsChanged
		case cur.Enabled != next.Enabled && next.Enabled:
			h.reason = ReasonEnabled
		case cur.Enabled != next.Enabled:
			h.reason = ReasonDisabled
		case !bytes.Equal(cur.Metadata, next.Metadata):
			h.reason = ReasonMetadataChanged
		default:
			h.noop = true
			return next, h, nil
		}
		if credsChanged || checkSettingChanged {
			next.Revision++
			next.Confirmation = Confirmation{}
			if next.Transient.Misconfigured {
				// The misconfiguration was the old settings' or
				// credentials'; the new ones are validated at once.
				next.Transient = Transient{}
			}
		}
		if cur.Unreadable || cur.Credentials.RefreshToken != next.Credentials.RefreshToken {
			// The failing refresh token is gone with its failures.
			next.Refresh.Failures, next.Refresh.LastError = 0, ""
		}
		return next, h, nil
	})
}

// checkMetadata checks Input.Metadata: nil keeps, null clears (nil
// result), otherwise a JSON object of at most MaxMetadataBytes, compacted.
func checkMetadata(raw json.RawMessage) (json.RawMessage, error) {
	if raw == nil {
		return nil, nil
	}
	if len(raw) > MaxMetadataBytes {
		return nil, &FieldError{Field: "metadata", Msg: fmt.Sprintf("larger than %d bytes", MaxMetadataBytes)}
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, &FieldError{Field: "metadata", Msg: "must be a JSON object or null"}
	}
	if len(obj) == 0 {
		return nil, nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		return nil, &FieldError{Field: "metadata", Msg: "must be a JSON object or null"}
	}
	return buf.Bytes(), nil
}

func nonEmpty(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		if v != "" {
			out[k] = v
		}
	}
	return out
}

// MaxCredentialLen caps one credential value, in bytes (16 KiB). The
// longest real credentials are JWT access tokens carrying many claims, a
// few KiB; every one of them goes into one request header, and most
// servers refuse a header line above 8 to 16 KiB. A longer value is a
// paste error or abuse, not a credential.
const MaxCredentialLen = 16 << 10

// ErrInvalidCredential is matched (errors.Is) by the *FieldError of a
// credential value the store refuses: longer than MaxCredentialLen, a
// control character, or not valid UTF-8. The error names the field, never
// the value.
var ErrInvalidCredential = errors.New("state: invalid credential value")

// validateCredentialFields accepts the integration's credential fields,
// and for OAuth the token fields, in name order; and each value that is
// set must be a credential (checkCredentialValue).
func validateCredentialFields(in *catalog.Integration, creds map[string]string) error {
	for _, f := range slices.Sorted(maps.Keys(creds)) {
		ok := slices.Contains(in.CredentialFields, f)
		if in.AuthType == catalog.AuthOAuth2 {
			ok = ok || f == catalog.FieldAccessToken || f == catalog.FieldRefreshToken || f == catalog.FieldExpiresAt
		}
		if !ok {
			if fieldNameRE(f) {
				return &FieldError{Field: "credentials." + f, Msg: "not a credential field of " + in.ID}
			}
			return &FieldError{Field: "credentials", Msg: "unknown credential field of " + in.ID}
		}
		if msg := checkCredentialValue(creds[f]); msg != "" {
			return &FieldError{Field: "credentials." + f, Msg: msg, Err: ErrInvalidCredential}
		}
	}
	return nil
}

// checkCredentialValue says what is wrong with a credential value, "" if
// nothing: at most MaxCredentialLen bytes, valid UTF-8 (and no U+FFFD, the
// mark a decoder leaves where it replaced invalid bytes), no C0 control
// character (CR, LF, NUL, tab, ...) and no DEL. Every credential ends up in
// a request header or URL, where CR/LF would split or break the request.
// The message never quotes the value.
func checkCredentialValue(v string) string {
	switch {
	case len(v) > MaxCredentialLen:
		return fmt.Sprintf("longer than %d bytes", MaxCredentialLen)
	case !utf8.ValidString(v) || strings.ContainsRune(v, utf8.RuneError):
		return "not valid UTF-8"
	case strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		return "control character (CR, LF, NUL, tab, DEL, ...) not allowed"
	}
	return ""
}

// fieldNameRE reports whether a field name is safe to echo in an error
// (a short snake_case name, not a pasted value).
func fieldNameRE(f string) bool {
	if f == "" || len(f) > 64 {
		return false
	}
	for _, r := range f {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '_' {
			return false
		}
	}
	return true
}

func validateSettings(in *catalog.Integration, ref Ref, settings map[string]string) error {
	if err := in.ValidateSettings(settings); err != nil {
		return fmt.Errorf("state: settings of %s: %w", ref.ConnectionID, err)
	}
	return nil
}

func (s *Store) delete(ctx context.Context, ref Ref, ifVersion int64) (Change, error) {
	if err := validateRef(ref); err != nil {
		return Change{}, err
	}
	in, _ := s.integration(ref.ConnectionID) // a connection whose integration left the catalog can still go
	return s.write(ctx, ref, in, nil, func(cur *Connection, _ time.Time) (*Connection, hints, error) {
		switch {
		case cur == nil:
			return nil, hints{}, ErrNotFound
		case ifVersion > 0 && cur.Version != ifVersion:
			return nil, hints{}, ErrVersionConflict
		}
		return nil, hints{reason: ReasonDeleted, consumer: true}, nil
	})
}

// --- fleet-side writes ---

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
	if v.Outcome != Valid && v.Outcome != InvalidCred {
		return Change{}, &FieldError{Field: "verdict.outcome", Msg: `must be "valid" or "invalid"`}
	}
	return s.fleetWriteFenced(ctx, ref, seen, f, func(c *Connection, in *catalog.Integration, now time.Time) (hints, error) {
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
	})
}

// foldVerdict applies v (for c's current revision) to c as ApplyVerdict
// does: a valid verdict clears Confirmation; an invalid one is held in
// Confirmation while the integration's ConfirmInvalid asks for more
// (confirm reports that), and decides otherwise. Transient failures end.
func foldVerdict(c *Connection, in *catalog.Integration, v Verdict, now time.Time) (confirm bool) {
	rev := v.Revision
	c.Transient = Transient{}
	if v.Outcome == Valid {
		c.Verdict, c.Confirmation = &v, Confirmation{}
		return false
	}
	alreadyInvalid := c.Verdict != nil && c.Verdict.Revision == rev && c.Verdict.Outcome == InvalidCred
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
	if c == nil || in == nil || v.Outcome != InvalidCred {
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
		if v := c.Verdict; v != nil && v.Outcome == InvalidCred && v.Lineage != "" && v.Lineage == Lineage(used) {
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
		return hints{reason: ReasonTokenRefreshed}, nil
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
