package monitor

import (
	"mime"
	"net/http"
)

// crossOrigin refuses requests a browser marks as coming from another
// site: Sec-Fetch-Site other than same-origin or none, or else an Origin
// whose host is not the request's Host. Requests with neither header
// (non-browser clients, which hold no cached credentials of a visitor)
// pass, and so do GET, HEAD and OPTIONS.
var crossOrigin = http.NewCrossOriginProtection()

// refuseWrite says why a request that would change tasks or queues is
// refused, with its status; 0 lets it through. With the operator's basic
// auth cached by the browser, any page could otherwise pause queues or
// delete tasks with a form POST: a write must come from the monitor's own
// origin, and carry JSON or no body at all (asynqmon's own requests do),
// never the form or text/plain bodies a cross-site form can send. In
// read-only mode every write is refused, whatever asynqmon would do.
func (h *Handler) refuseWrite(r *http.Request) (int, string) {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return 0, ""
	}
	if h.cfg.ReadOnly {
		return http.StatusMethodNotAllowed, "the monitor is read-only: " + r.Method + " is not allowed"
	}
	if err := crossOrigin.Check(r); err != nil {
		return http.StatusForbidden, "cross-origin request refused: the monitor changes tasks and queues only from its own pages"
	}
	ct := r.Header.Get("Content-Type")
	if ct == "" && r.ContentLength == 0 && len(r.TransferEncoding) == 0 {
		return 0, ""
	}
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		return http.StatusUnsupportedMediaType, "a monitor write takes a JSON body (Content-Type: application/json) or none"
	}
	return 0, ""
}
