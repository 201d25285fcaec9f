package api_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCredentialValuesRefused: a credential value that is too long, holds
// CR/LF or is not valid UTF-8 is refused with 422 (400 for a body that is
// not UTF-8 at all), naming the field and never echoing the value; nothing
// is written and nobody is notified.
func TestCredentialValuesRefused(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const secret = "SECRET-value-9999"
	path := connPath("c-val", "crm", "pipedrive")
	cases := []struct {
		desc       string
		body       string
		wantStatus int
		wantCode   string
		wantField  string
	}{
		{"900KBKey", `{"credentials":{"api_key":"` + secret + strings.Repeat("k", 900<<10) + `"}}`,
			http.StatusUnprocessableEntity, "invalid_credential", "credentials.api_key"},
		{"CRLF", `{"credentials":{"api_key":"` + secret + `a\r\nb"}}`,
			http.StatusUnprocessableEntity, "invalid_credential", "credentials.api_key"},
		{"NUL", `{"credentials":{"api_key":"` + secret + `\u0000"}}`,
			http.StatusUnprocessableEntity, "invalid_credential", "credentials.api_key"},
		{"LoneSurrogate", `{"credentials":{"api_key":"` + secret + `\udc00"}}`,
			http.StatusUnprocessableEntity, "invalid_credential", "credentials.api_key"},
		{"RawInvalidUTF8", `{"credentials":{"api_key":"` + secret + "\xff\xfe" + `"}}`,
			http.StatusBadRequest, "invalid_json", ""},
	}
	for _, c := range cases {
		t.Run(c.desc, func(t *testing.T) {
			before := b.snapshot(t)
			notified := b.notifier.count()
			for _, method := range []string{"PUT", "PATCH"} {
				r := b.req(t, method, path, c.body)
				if method == "PATCH" && c.wantStatus == http.StatusUnprocessableEntity {
					// Nothing was added: the patch fails with 404 or the
					// same 422, never a write.
					require.Contains(t, []int{http.StatusNotFound, c.wantStatus}, r.status, "%s", truncate(r.body))
					continue
				}
				require.Equal(t, c.wantStatus, r.status, "%s %s", method, truncate(r.body))
				require.Equal(t, c.wantCode, r.errorCode(t), "%s", truncate(r.body))
				require.NotContains(t, string(r.body), secret, "the value is never echoed")
				if c.wantField != "" {
					require.Contains(t, string(r.body), c.wantField)
				} else {
					require.Contains(t, string(r.body), "UTF-8")
				}
			}
			require.Equal(t, before, b.snapshot(t), "the refused request wrote something")
			require.Equal(t, notified, b.notifier.count())
		})
	}

	// An existing connection keeps its credentials when a PATCH is refused.
	r := b.req(t, "PUT", path, `{"credentials":{"api_key":"good-key"}}`)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	before := b.snapshot(t)
	r = b.req(t, "PATCH", path, `{"credentials":{"api_key":"`+secret+`a\r\nb"}}`)
	require.Equal(t, http.StatusUnprocessableEntity, r.status)
	require.Equal(t, "invalid_credential", r.errorCode(t))
	require.Equal(t, before, b.snapshot(t))
}
