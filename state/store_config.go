package state

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// MaxShards is the largest number of index shards.
const MaxShards = 1024

// List page sizes.
const (
	DefaultListLimit = 50
	MaxListLimit     = 500
)

// Write tuning.
const (
	// maxAttempts bounds the optimistic read-modify-write loop of a write
	// that keeps meeting concurrent writes of the same connection.
	maxAttempts = 20
	// safetyNet is how soon a connection whose credentials changed (or
	// that was created or enabled) becomes due for a check: the API
	// enqueues the validation at once, the sweep catches a lost enqueue.
	safetyNet = 30 * time.Second
	// maxErrorLen truncates the transient and refresh error texts kept.
	maxErrorLen = 200
)

// ErrContention means a write kept meeting concurrent writes of the same
// connection and gave up; retrying later is safe.
var ErrContention = errors.New("state: too many concurrent writes of one connection")

// withDefaults returns cfg with the defaults documented on each field
// applied.
func (c Config) withDefaults() Config {
	c.Shards = cmp.Or(c.Shards, DefaultShards)
	c.Prefix = cmp.Or(c.Prefix, DefaultPrefix)
	c.EventStream = cmp.Or(c.EventStream, DefaultEventStream)
	c.EventMaxLen = cmp.Or(c.EventMaxLen, DefaultEventMaxLen)
	if c.NowFunc == nil {
		c.NowFunc = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.Client == nil:
		return errors.New("state: Config.Client is nil")
	case c.Catalog == nil:
		return errors.New("state: Config.Catalog is nil")
	case c.Keys == nil:
		return errors.New("state: Config.Keys is nil")
	case c.Shards < 1 || c.Shards > MaxShards:
		return fmt.Errorf("state: Config.Shards must be between 1 and %d, got %d", MaxShards, c.Shards)
	case c.EventMaxLen < 0:
		return fmt.Errorf("state: Config.EventMaxLen must not be negative, got %d", c.EventMaxLen)
	case strings.ContainsAny(c.Prefix, "{}"):
		return errors.New("state: Config.Prefix must not contain '{' or '}' (they would change the hash tag)")
	}
	return nil
}

// now returns the store's clock in UTC.
func (s *Store) now() time.Time { return s.cfg.NowFunc().UTC() }
