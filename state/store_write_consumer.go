package state

import (
	"bytes"
	"context"
	"maps"
	"slices"
	"time"
)

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
			h.reason = EventReasonCreated
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
			h.reason = EventReasonCredentialsChanged
		case settingsChanged:
			h.reason = EventReasonSettingsChanged
		case cur.Enabled != next.Enabled && next.Enabled:
			h.reason = EventReasonEnabled
		case cur.Enabled != next.Enabled:
			h.reason = EventReasonDisabled
		case !bytes.Equal(cur.Metadata, next.Metadata):
			h.reason = EventReasonMetadataChanged
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
		return nil, hints{reason: EventReasonDeleted, consumer: true}, nil
	})
}
