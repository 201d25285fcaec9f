package state

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// FlowStates keeps the connect flow's OAuth states between the redirect to
// the provider and its callback: each one short-lived and taken at most
// once (GETDEL), so a state cannot be replayed. Keys:
//
//	<prefix>:connect:state:<id>   the flow's record, with its TTL
//
// The caller names a state by a digest of the value the browser carries,
// so that a Redis dump does not hand out live states. Safe for concurrent
// use.
type FlowStates struct {
	client redis.UniversalClient
	prefix string
}

// NewFlowStates returns the flow states whose keys start with prefix
// (DefaultPrefix if empty).
func NewFlowStates(client redis.UniversalClient, prefix string) *FlowStates {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &FlowStates{client: client, prefix: prefix + ":connect:state:"}
}

// Put keeps value under id for ttl.
func (f *FlowStates) Put(ctx context.Context, id string, value []byte, ttl time.Duration) error {
	if ttl <= 0 {
		return &FieldError{Field: "ttl", Msg: "must be positive"}
	}
	if err := f.client.Set(ctx, f.prefix+id, value, ttl).Err(); err != nil {
		return fmt.Errorf("state: keep flow state: %w", err)
	}
	return nil
}

// Take returns the value under id and deletes it; ok is false when there
// is none (never put, taken already, or expired).
func (f *FlowStates) Take(ctx context.Context, id string) (value []byte, ok bool, err error) {
	b, err := f.client.GetDel(ctx, f.prefix+id).Bytes()
	switch {
	case errors.Is(err, redis.Nil):
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("state: take flow state: %w", err)
	}
	return b, true, nil
}
