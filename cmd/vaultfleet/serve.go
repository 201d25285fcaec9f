package main

import (
	"context"
	"errors"
)

// runServe is replaced by its issue's implementation.
func runServe(ctx context.Context, args []string, env Env) error {
	return errors.New("not built yet")
}
