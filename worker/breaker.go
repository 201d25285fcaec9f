package worker

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/sony/gobreaker/v2"
)

// errProviderTrouble is what a transient check result reports to the
// breaker; errNotCounted is what a check that never reached a verdict for
// other reasons (cancelled task, rate limit) reports: excluded.
var (
	errProviderTrouble = errors.New("provider trouble")
	errNotCounted      = errors.New("not counted")
)

// breakers holds one circuit breaker per integration. A breaker trips when
// at least minRequests checks ran within the rolling window and at least
// ratio of them failed transiently; after the cool-down it lets probes
// through (half-open) and closes when they all pass. Valid and invalid
// answers are successes: the provider answered.
type breakers struct {
	cfg Config
	m   *metrics
	log *slog.Logger

	mu sync.Mutex
	by map[string]*gobreaker.TwoStepCircuitBreaker[struct{}]
}

func newBreakers(cfg Config, m *metrics, log *slog.Logger) *breakers {
	return &breakers{cfg: cfg, m: m, log: log, by: map[string]*gobreaker.TwoStepCircuitBreaker[struct{}]{}}
}

func (b *breakers) get(integration string) *gobreaker.TwoStepCircuitBreaker[struct{}] {
	b.mu.Lock()
	defer b.mu.Unlock()
	if cb, ok := b.by[integration]; ok {
		return cb
	}
	minReq := uint32(b.cfg.BreakerMinRequests)
	ratio := b.cfg.BreakerFailureRatio
	window := b.cfg.BreakerWindow
	bucket := window / 6
	if bucket < time.Millisecond {
		bucket = 0
	}
	cb := gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:         integration,
		MaxRequests:  uint32(b.cfg.BreakerProbes),
		Interval:     window,
		BucketPeriod: bucket,
		Timeout:      b.cfg.BreakerCoolDown,
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.Requests >= minReq && float64(c.TotalFailures) >= ratio*float64(c.Requests)
		},
		IsSuccessful: func(err error) bool { return err == nil },
		IsExcluded:   func(err error) bool { return errors.Is(err, errNotCounted) },
		OnStateChange: func(name string, from, to gobreaker.State) {
			open := 0.0
			if to != gobreaker.StateClosed {
				open = 1
			}
			b.m.circuitOpen.WithLabelValues(name).Set(open)
			level := slog.LevelInfo
			if to == gobreaker.StateOpen {
				level = slog.LevelWarn
			}
			b.log.Log(context.Background(), level, "circuit breaker "+to.String(),
				slog.String(keyIntegration, name), slog.String("from", from.String()), slog.String("to", to.String()))
		},
	})
	b.m.circuitOpen.WithLabelValues(integration).Set(0)
	b.by[integration] = cb
	return cb
}

// allow asks the integration's breaker whether a check may go out. done
// must be called with the check's result: nil (the provider answered),
// errProviderTrouble, or errNotCounted.
func (b *breakers) allow(integration string) (done func(error), err error) {
	done, err = b.get(integration).Allow()
	if err != nil {
		return nil, &RetryAfterError{After: jitter(b.cfg.BreakerCoolDown / 2), Err: ErrCircuitOpen}
	}
	return done, nil
}

// state reports the integration's breaker state (for tests and logs).
func (b *breakers) state(integration string) gobreaker.State {
	return b.get(integration).State()
}
