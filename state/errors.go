package state

import (
	"errors"
	"fmt"
)

// ErrNotFound means the connection does not exist (it is `available`).
var ErrNotFound = errors.New("state: connection not found")

// ErrStale means a fleet-side write was computed against credentials that
// have changed since (another revision, another refresh token): the caller
// drops it.
var ErrStale = errors.New("state: stale write dropped")

// ErrVersionConflict means the connection's version is not the one the
// caller expected (If-Match).
var ErrVersionConflict = errors.New("state: version conflict")

// ErrExists means an add found the connection already present.
var ErrExists = errors.New("state: connection already exists")

// FieldError says which input field is wrong and why. It never carries the
// value, which may be a secret.
type FieldError struct {
	Field string
	Msg   string
	// Err, if set, classifies the error (ErrInvalidCredential); errors.Is
	// matches it.
	Err error
}

func (e *FieldError) Error() string { return fmt.Sprintf("state: %s: %s", e.Field, e.Msg) }

func (e *FieldError) Unwrap() error { return e.Err }
