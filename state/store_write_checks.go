package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/vaultfleet/vaultfleet/catalog"
)

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
