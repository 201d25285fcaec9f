// Command vaultfleet runs the validation worker fleet: one binary with a
// subcommand per process.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

type command struct {
	name  string
	short string
	run   func(ctx context.Context, args []string, env Env) error
}

var commands = []command{
	{"dev", "everything in one process on an embedded Redis, with simulated providers", runDev},
	{"worker", "the asynq server: validation, token refresh and webhook handlers", runWorker},
	{"scheduler", "sweeps that claim due checks and refreshes and enqueue them", runScheduler},
	{"serve", "the HTTP API and the embedded Asynq web monitor", runServe},
	{"enqueue", "enqueue a validation or refresh: enqueue validate|refresh --consumer C --connection ID", runEnqueue},
	{"reseal", "re-encrypt every connection's credentials under the first key, so old keys can be retired", runReseal},
	{"bench", "measure checks/s, Redis round trips, CPU and bytes per connection against their baselines (BENCHMARKS.md)", runBench},
}

// Env is what a command reads from outside: environment and output.
type Env struct {
	Getenv func(string) string
	Stdout io.Writer
	Stderr io.Writer
}

func main() {
	env := Env{Getenv: os.Getenv, Stdout: os.Stdout, Stderr: os.Stderr}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], env)
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and turns its error into an exit code
// with a one-line reason.
func run(ctx context.Context, args []string, env Env) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(env.Stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], env)
		switch {
		case err == nil, errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		}
		fmt.Fprintf(env.Stderr, "vaultfleet %s: %v\n", c.name, err)
		return 1
	}
	fmt.Fprintf(env.Stderr, "vaultfleet: unknown command %q\n", args[0])
	usage(env.Stderr)
	return 2
}

// errUsage means the flag package already printed what was wrong.
var errUsage = errors.New("usage")

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: vaultfleet <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.short)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'vaultfleet <command> --help' for its flags and environment variables.")
}
