// Package redact bounds what of an input or a URL reaches a log line, an
// error message or a stored record: URLs lose their user info, query and
// fragment (where passwords, API keys and tokens travel), HTTP client
// errors lose their URL, and echoed input is cut short.
package redact

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"unicode/utf8"
)

// Mask stands in for user info that was removed.
const Mask = "xxxxx"

// URL keeps scheme, host and path of raw: user info becomes Mask, query
// and fragment are dropped. A value url.Parse refuses is cut the same way
// by hand, or said to be unparsable.
func URL(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		return Parsed(u)
	}
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return "(unparsable URL)"
	}
	rest, _, _ = strings.Cut(rest, "#")
	rest, _, _ = strings.Cut(rest, "?")
	if i := strings.LastIndex(rest, "@"); i >= 0 {
		rest = Mask + rest[i:]
	}
	return scheme + "://" + rest
}

// Parsed is URL for a parsed u.
func Parsed(u *url.URL) string {
	if u == nil {
		return ""
	}
	if u.Opaque != "" {
		return u.Scheme + ":(opaque)"
	}
	var b strings.Builder
	if u.Scheme != "" {
		b.WriteString(u.Scheme + "://")
	}
	if u.User != nil {
		b.WriteString(Mask + "@")
	}
	b.WriteString(u.Host)
	b.WriteString(u.EscapedPath())
	return b.String()
}

// URLError says why an HTTP client call failed without its URL (a query
// string or even a path may carry a receiver's token): "timeout",
// "canceled", or the reason the transport gave. Other errors are returned
// as they are.
func URLError(err error) string {
	if err == nil {
		return ""
	}
	var ue *url.Error
	if !errors.As(err, &ue) {
		return err.Error()
	}
	switch {
	case ue.Timeout() || errors.Is(ue.Err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(ue.Err, context.Canceled):
		return "canceled"
	case ue.Err == nil:
		return "request failed"
	}
	return URLError(ue.Err)
}

// Truncate keeps at most n characters (runes) of s; a cut text ends in
// "..." within those n.
func Truncate(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	const ellipsis = "..."
	if n <= len(ellipsis) {
		return string([]rune(s)[:max(n, 0)])
	}
	return string([]rune(s)[:n-len(ellipsis)]) + ellipsis
}
