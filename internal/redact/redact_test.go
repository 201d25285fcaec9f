package redact

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://api.example.com/v1/me?api_key=SECRET#frag": "https://api.example.com/v1/me",
		"https://user:SECRET@api.example.com/x":             "https://xxxxx@api.example.com/x",
		"https://SECRET@api.example.com/x":                  "https://xxxxx@api.example.com/x",
		"redis://:SECRET@127.0.0.1:1/0":                     "redis://xxxxx@127.0.0.1:1/0",
		"redis://:SEC%zzRET@127.0.0.1:1/0?password=x":       "redis://xxxxx@127.0.0.1:1/0",
		"rediss://h:6380/2":                                 "rediss://h:6380/2",
		"no scheme %zz":                                     "(unparsable URL)",
		"mailto:SECRET@example.com":                         "mailto:(opaque)",
	} {
		got := URL(in)
		assert.Equal(t, want, got, "URL(%q)", in)
		assert.NotContains(t, got, "SECRET")
	}
	assert.Equal(t, "", Parsed(nil))
}

func TestURLError(t *testing.T) {
	u := "https://hooks.example.com/services/SECRET?token=SECRET"
	for want, err := range map[string]error{
		"timeout":            &url.Error{Op: "Post", URL: u, Err: context.DeadlineExceeded},
		"canceled":           fmt.Errorf("wrapped: %w", &url.Error{Op: "Post", URL: u, Err: context.Canceled}),
		"connection refused": &url.Error{Op: "Post", URL: u, Err: errors.New("connection refused")},
		"request failed":     &url.Error{Op: "Post", URL: u},
		"plain":              errors.New("plain"),
	} {
		got := URLError(err)
		assert.Equal(t, want, got)
		assert.NotContains(t, got, "SECRET")
	}
	assert.Equal(t, "", URLError(nil))
}

func TestTruncate(t *testing.T) {
	assert.Equal(t, "short", Truncate("short", 5))
	assert.Equal(t, "ab...", Truncate("abcdef", 5))
	assert.Equal(t, "ééé...", Truncate(strings.Repeat("é", 10), 6))
	assert.Equal(t, "ab", Truncate("abcdef", 2))
	assert.Equal(t, "", Truncate("abcdef", -1))
	assert.Len(t, []rune(Truncate(strings.Repeat("é", 300), 200)), 200)
}
