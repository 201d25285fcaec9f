package catalog

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"
)

// placeholderBaseURL is the placeholder for Integration.BaseURL.
const placeholderBaseURL = "base_url"

// maxTextLen bounds a text setting value.
const maxTextLen = 256

var placeholderRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)

// where is the part of a template a placeholder sits in.
type where int

const (
	inScheme   where = iota // before "://": never allowed
	inOrigin                // the very start: a url setting or {base_url}
	inHost                  // the host name
	inPort                  // the port: never allowed
	inPath                  // the path: one escaped segment
	inQuery                 // the query: one escaped value
	inFragment              // the fragment: never allowed
	inHeader                // a header value
)

// segment is a literal or a placeholder of a template.
type segment struct {
	lit   string
	name  string // placeholder name; "" for a literal
	where where
}

// missingError is an empty setting a template needs; errors.Is matches
// ErrMissingSetting.
type missingError struct{ name string }

func (e *missingError) Error() string { return fmt.Sprintf("setting %q is missing", e.name) }

func (e *missingError) Is(target error) bool { return target == ErrMissingSetting }

// settingError is a setting value the rules refuse; it wraps
// ErrInvalidSetting and the reason (which may be ErrHostNotAllowed).
type settingError struct {
	name string
	err  error
}

func (e *settingError) Error() string { return fmt.Sprintf("setting %q: %v", e.name, e.err) }

func (e *settingError) Unwrap() []error { return []error{ErrInvalidSetting, e.err} }

// splitTemplate cuts a template into literals and {placeholders}.
func splitTemplate(t string) ([]segment, error) {
	var segs []segment
	for t != "" {
		i := strings.IndexAny(t, "{}")
		if i < 0 {
			segs = append(segs, segment{lit: t})
			break
		}
		if t[i] == '}' {
			return nil, errors.New("unmatched '}'")
		}
		if i > 0 {
			segs = append(segs, segment{lit: t[:i]})
		}
		j := strings.IndexByte(t[i:], '}')
		if j < 0 {
			return nil, errors.New("unclosed '{'")
		}
		name := t[i+1 : i+j]
		if !placeholderRE.MatchString(name) {
			return nil, fmt.Errorf("bad placeholder {%s}: want a snake_case name", name)
		}
		segs = append(segs, segment{name: name})
		t = t[i+j+1:]
	}
	return segs, nil
}

// settingType returns the type of the named setting ("" means text).
func (in *Integration) settingType(name string) (string, bool) {
	for _, s := range in.Settings {
		if s.Name == name {
			if s.Type == "" {
				return SettingText, true
			}
			return s.Type, true
		}
	}
	return "", false
}

// compileURL splits a URL template and checks where each placeholder sits.
func (in *Integration) compileURL(t string) ([]segment, error) {
	segs, err := splitTemplate(t)
	if err != nil {
		return nil, err
	}
	if len(segs) == 0 {
		return nil, errors.New("empty template")
	}
	pos := inScheme
	for i := range segs {
		s := &segs[i]
		if s.name != "" {
			if i == 0 {
				s.where, pos = inOrigin, inPath
			} else {
				s.where = pos
			}
			continue
		}
		lit := s.lit
		if i == 1 && segs[0].name != "" && !strings.HasPrefix(lit, "/") && !strings.HasPrefix(lit, "?") {
			return nil, fmt.Errorf("{%s} at the start must be followed by '/' or '?'", segs[0].name)
		}
		for k := 0; k < len(lit); k++ {
			c := lit[k]
			switch pos {
			case inScheme:
				if strings.HasPrefix(lit[k:], "://") {
					pos, k = inHost, k+2
				} else if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.') {
					return nil, errors.New("must start with a lower-case scheme:// or a {url setting}")
				}
			case inHost, inPort:
				switch {
				case c == '/':
					pos = inPath
				case c == '?':
					pos = inQuery
				case c == '#':
					pos = inFragment
				case c == ':' && pos == inHost:
					pos = inPort
				case c == '@' || c == '\\' || c == '%':
					return nil, fmt.Errorf("%q in the host part", c)
				case pos == inPort && (c < '0' || c > '9'):
					return nil, errors.New("bad port")
				}
			case inPath:
				switch c {
				case '?':
					pos = inQuery
				case '#':
					pos = inFragment
				}
			case inQuery:
				if c == '#' {
					pos = inFragment
				}
			}
		}
	}
	if pos == inScheme {
		return nil, errors.New("must start with scheme:// or a {url setting}")
	}
	for i, s := range segs {
		if s.name == "" {
			continue
		}
		if err := in.checkPlaceholder(segs, i); err != nil {
			return nil, err
		}
	}
	return segs, nil
}

// checkPlaceholder checks that placeholder segs[i] is declared and may sit
// where it does.
func (in *Integration) checkPlaceholder(segs []segment, i int) error {
	s := segs[i]
	typ := SettingURL // {base_url} behaves like a url setting
	if s.name == placeholderBaseURL {
		if in.BaseURL == "" {
			return errors.New("placeholder {base_url} but base_url is empty")
		}
	} else {
		var ok bool
		if typ, ok = in.settingType(s.name); !ok {
			return fmt.Errorf("placeholder {%s} is not a declared setting", s.name)
		}
	}
	switch s.where {
	case inScheme, inPort, inFragment:
		return fmt.Errorf("placeholder {%s} may not sit in the scheme, port or fragment", s.name)
	case inHeader:
		return nil
	}
	switch typ {
	case SettingURL:
		if s.where != inOrigin {
			return fmt.Errorf("placeholder {%s} (a URL) may only start the template", s.name)
		}
	case SettingHost:
		whole := s.where == inHost && i > 0 && segs[i-1].name == "" && strings.HasSuffix(segs[i-1].lit, "://") &&
			(i+1 == len(segs) || segs[i+1].name == "" && strings.ContainsAny(segs[i+1].lit[:1], ":/?#"))
		if !whole {
			return fmt.Errorf("placeholder {%s} (a host) must be the whole host, as in https://{%s}/path", s.name, s.name)
		}
	case SettingText:
		if s.where == inOrigin {
			return fmt.Errorf("placeholder {%s} (text) cannot start the template: only a url setting or {base_url} can", s.name)
		}
	default:
		return fmt.Errorf("placeholder {%s}: setting has unknown type %q", s.name, typ)
	}
	return nil
}

// compileHeader splits a header value template.
func (in *Integration) compileHeader(t string) ([]segment, error) {
	segs, err := splitTemplate(t)
	if err != nil {
		return nil, err
	}
	for i := range segs {
		segs[i].where = inHeader
		if segs[i].name != "" {
			if err := in.checkPlaceholder(segs, i); err != nil {
				return nil, err
			}
		}
	}
	return segs, nil
}

// fill substitutes the placeholders of a compiled template.
func (in *Integration) fill(segs []segment, settings map[string]string) (string, error) {
	var b strings.Builder
	for _, s := range segs {
		if s.name == "" {
			b.WriteString(s.lit)
			continue
		}
		v, err := in.value(s, settings)
		if err != nil {
			return "", err
		}
		b.WriteString(v)
	}
	return b.String(), nil
}

// value is the checked, encoded value for one placeholder.
func (in *Integration) value(s segment, settings map[string]string) (string, error) {
	if s.name == placeholderBaseURL {
		return strings.TrimRight(in.BaseURL, "/"), nil
	}
	v := settings[s.name]
	if v == "" {
		return "", &missingError{name: s.name}
	}
	typ, _ := in.settingType(s.name)
	var out string
	var err error
	switch typ {
	case SettingURL:
		out, err = in.urlValue(v)
	case SettingHost:
		out, err = in.hostValue(v)
	default:
		switch s.where {
		case inHost:
			out, err = labelValue(v)
		case inPath:
			if err = textValue(v); err == nil {
				out = url.PathEscape(v)
			}
		case inQuery:
			if err = textValue(v); err == nil {
				out = url.QueryEscape(v)
			}
		case inHeader:
			out, err = v, textValue(v)
		default:
			err = errors.New("cannot be substituted here")
		}
	}
	if err != nil {
		return "", &settingError{name: s.name, err: err}
	}
	return out, nil
}

// buildURL fills a URL template and applies the host rules to the result.
func (in *Integration) buildURL(field, t string, settings map[string]string) (*url.URL, error) {
	segs, err := in.compileURL(t)
	if err != nil {
		return nil, fmt.Errorf("catalog: integration %q: %s: %w", in.ID, field, err)
	}
	raw, err := in.fill(segs, settings)
	if err != nil {
		return nil, fmt.Errorf("catalog: integration %q: %s: %w", in.ID, field, err)
	}
	if strings.ContainsAny(raw, "\\") || hasControl(raw) {
		return nil, fmt.Errorf("catalog: integration %q: %s: built URL has a backslash or control character", in.ID, field)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("catalog: integration %q: %s: %w", in.ID, field, err)
	}
	if err := in.allow(u); err != nil {
		return nil, fmt.Errorf("catalog: integration %q: %s: %w", in.ID, field, err)
	}
	return u, nil
}

func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// textValue checks a text value: one path segment at most 256 bytes long,
// not "." or "..", without control characters, '/', '\' or '%' (some
// servers decode %2F before routing, so an escaped slash is no safer).
func textValue(v string) error {
	switch {
	case v == "":
		return errors.New("empty value")
	case len(v) > maxTextLen:
		return fmt.Errorf("longer than %d bytes", maxTextLen)
	case v == "." || v == "..":
		return fmt.Errorf("value %q is not a path segment", v)
	case !utf8.ValidString(v):
		return errors.New("not valid UTF-8")
	case hasControl(v):
		return errors.New("control character in value")
	case strings.ContainsAny(v, "/\\%"):
		return fmt.Errorf("value %q must be one segment: no '/', '\\' or '%%'", v)
	}
	return nil
}

// labelValue checks a text value used in a host: one lower-cased DNS label.
func labelValue(v string) (string, error) {
	l := strings.ToLower(v)
	if !dnsLabelRE.MatchString(l) {
		return "", hostErr(v, "not a DNS label (letters, digits and inner hyphens, at most 63)")
	}
	return l, nil
}

// authority returns the host[:port] part of a raw absolute URL as written.
func authority(raw string) string {
	_, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return ""
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	return rest
}

// urlValue checks a url setting value and returns its origin
// (scheme://host[:port], lower case) for substitution.
func (in *Integration) urlValue(v string) (string, error) {
	if hasControl(v) || strings.ContainsAny(v, " \t") {
		return "", errors.New("control character or space in URL")
	}
	if a := authority(v); strings.ContainsAny(a, "@\\%") {
		return "", hostErr(a, "userinfo, backslash or percent-encoding in host")
	}
	u, err := url.Parse(v)
	if err != nil {
		return "", fmt.Errorf("not a URL: %w", errors.Unwrap(err))
	}
	if !u.IsAbs() || u.Host == "" {
		return "", fmt.Errorf("%q is not an absolute URL", v)
	}
	if err := in.allow(u); err != nil {
		return "", err
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(v, "#") {
		return "", fmt.Errorf("%q must be scheme://host only, without path, query or fragment", v)
	}
	return strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host), nil
}

// hostValue checks a host setting value as https://value and returns it in
// lower case.
func (in *Integration) hostValue(v string) (string, error) {
	h := strings.ToLower(v)
	if hasControl(h) || strings.ContainsAny(h, "/\\@?#% \t") {
		return "", hostErr(v, "not a plain host name")
	}
	u, err := url.Parse("https://" + h)
	if err != nil || u.Host != h || u.Path != "" {
		return "", hostErr(v, "not a plain host name")
	}
	if err := in.allow(u); err != nil {
		return "", err
	}
	return h, nil
}

// urlTemplates returns the URL templates of the integration by field.
func (in *Integration) urlTemplates() [][2]string {
	ts := [][2]string{{"check.url", in.Check.URL}}
	if in.OAuth != nil && in.OAuth.TokenURL != "" {
		ts = append(ts, [2]string{"oauth.token_url", in.OAuth.TokenURL})
	}
	if in.OAuth != nil && in.OAuth.AuthorizeURL != "" {
		ts = append(ts, [2]string{"oauth.authorize_url", in.OAuth.AuthorizeURL})
	}
	if in.OAuth != nil && in.OAuth.RevokeURL != "" {
		ts = append(ts, [2]string{"oauth.revoke_url", in.OAuth.RevokeURL})
	}
	for _, s := range in.Settings {
		if s.Choices != nil && s.Choices.URL != "" {
			ts = append(ts, [2]string{"settings." + s.Name + ".choices.url", s.Choices.URL})
		}
	}
	return ts
}

// placeholderUse reports whether any template (URLs and, when headers is
// true, check headers) uses the named placeholder, and whether it sits in
// a host part.
func (in *Integration) placeholderUse(name string, headers bool) (used, inHostPart bool) {
	for _, t := range in.urlTemplates() {
		segs, err := in.compileURL(t[1])
		if err != nil {
			segs, _ = splitTemplate(t[1])
		}
		for _, s := range segs {
			if s.name == name {
				used = true
				inHostPart = inHostPart || s.where == inHost
			}
		}
	}
	if headers {
		for _, v := range in.Check.Headers {
			segs, _ := splitTemplate(v)
			if slices.ContainsFunc(segs, func(s segment) bool { return s.name == name }) {
				used = true
			}
		}
	}
	return used, inHostPart
}
