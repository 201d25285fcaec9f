//go:build tools

// Package deps pins the modules the fleet is built on so that go mod tidy
// keeps them while the packages that use them are written.
package deps

import (
	_ "github.com/alicebob/miniredis/v2"
	_ "github.com/go-redis/redis_rate/v10"
	_ "github.com/hibiken/asynq"
	_ "github.com/hibiken/asynq/x/metrics"
	_ "github.com/hibiken/asynqmon"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/prometheus/client_golang/prometheus/collectors"
	_ "github.com/prometheus/client_golang/prometheus/promhttp"
	_ "github.com/prometheus/client_golang/prometheus/testutil"
	_ "github.com/redis/go-redis/v9"
	_ "github.com/sony/gobreaker/v2"
	_ "github.com/stretchr/testify/require"
	_ "go.uber.org/goleak"
	_ "golang.org/x/oauth2"
	_ "golang.org/x/sync/errgroup"
	_ "golang.org/x/time/rate"
	_ "gopkg.in/yaml.v3"
	_ "pgregory.net/rapid"
)
