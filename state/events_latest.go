package state

import (
	"context"
	"fmt"
)

// LatestEvents returns up to n of the newest stream entries, newest first
// (for the status page).
func (s *Store) LatestEvents(ctx context.Context, n int64) ([]Event, error) {
	if n <= 0 {
		return nil, nil
	}
	msgs, err := s.cfg.Client.XRevRangeN(ctx, s.cfg.EventStream, "+", "-", n).Result()
	if err != nil {
		return nil, fmt.Errorf("state: read latest events: %w", err)
	}
	return parseEvents(msgs)
}
