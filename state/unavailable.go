package state

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/redis/go-redis/v9"
)

// Unavailable reports whether err says the store could not be reached or
// could not serve right now (connection refused or reset, a timeout, the
// pool exhausted, a Redis that is loading, read-only after a failover or
// without a master): retrying later is safe. ErrContention is reported
// apart (errors.Is).
func Unavailable(err error) bool {
	if err == nil {
		return false
	}
	var ne net.Error
	switch {
	case errors.Is(err, ErrNotReplicated):
		return true
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, redis.ErrClosed), errors.Is(err, redis.ErrPoolTimeout),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return true
	}
	var re redis.Error
	if errors.As(err, &re) {
		for _, p := range []string{"LOADING ", "MASTERDOWN ", "READONLY ", "TRYAGAIN ", "CLUSTERDOWN ", "BUSY "} {
			if strings.HasPrefix(re.Error(), p) {
				return true
			}
		}
	}
	return false
}

// ReplyError reports whether err is an error reply of the Redis server
// (the server answered, so it is reachable: a slot migrating, a script
// refused), as opposed to a network error or a timeout.
func ReplyError(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled)
}
