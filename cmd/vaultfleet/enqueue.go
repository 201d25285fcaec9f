package main

import (
	"context"
	"errors"
)

// runEnqueue is replaced by its issue's implementation.
func runEnqueue(ctx context.Context, args []string, env Env) error {
	return errors.New("not built yet")
}
