package main

import (
	"context"
	"errors"
)

// runScheduler is replaced by its issue's implementation.
func runScheduler(ctx context.Context, args []string, env Env) error {
	return errors.New("not built yet")
}
