package main

import (
	"context"
	"errors"
)

// runWorker is replaced by its issue's implementation.
func runWorker(ctx context.Context, args []string, env Env) error {
	return errors.New("not built yet")
}
