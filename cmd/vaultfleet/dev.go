package main

import (
	"context"
	"errors"
)

// runDev is replaced by its issue's implementation.
func runDev(ctx context.Context, args []string, env Env) error {
	return errors.New("not built yet")
}
