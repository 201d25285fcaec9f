package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/vaultfleet/vaultfleet/internal/secrets"
	"github.com/vaultfleet/vaultfleet/state"
)

const resealSynopsis = `Seals again, under the FIRST key of ` + secrets.EnvKeys + `, the
credentials of every connection that another key sealed, so that the other
keys can then be removed from the keyring. It walks the index of every
shard (no SCAN), compares and sets each record like any write (safe while
the fleet runs: a concurrent write wins and is looked at again), and prints
progress. Records already under the first key cost one read: running it
again is cheap and resumes an interrupted run.

Rotation: put the new key first and keep the old one listed
(new:...,old:...) on every process, roll the fleet, run reseal until it
exits 0, then drop the old key and roll again.

Exit status 0 when every record is under the first key; 1 when some
record could not be opened with any key of the ring or not be rewritten
(their ids are printed, never a secret).`

// defaultResealProgress is how often progress is printed.
const defaultResealProgress = 2 * time.Second

func runReseal(ctx context.Context, args []string, env Env) error {
	cfg := newConfig(cmdReseal, cmdReseal, resealSynopsis, env)
	if err := cfg.parse(args); err != nil {
		return err
	}
	c := commonFrom(cfg)
	every := cfg.duration("progress")
	a, err := c.setup(env.Stderr)
	if err != nil {
		return err
	}
	defer a.Close()
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = a.Redis.Ping(pctx).Err()
	cancel()
	if err != nil {
		return fmt.Errorf("redis unreachable: %v", err)
	}
	// A walk with another shard count than the fleet's would miss records.
	pctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	err = checkShards(pctx, a.Redis, c.shards)
	cancel()
	if err != nil {
		return err
	}

	primary := a.Keys.PrimaryID()
	fmt.Fprintf(env.Stdout, "reseal: sealing every record under key %q\n", primary)
	start := time.Now()
	last := start
	p, err := a.Store.ResealAll(ctx, func(p state.ResealProgress) {
		if every > 0 && time.Since(last) >= every {
			last = time.Now()
			printResealProgress(env.Stdout, "progress", p, time.Since(start))
		}
	})
	printResealProgress(env.Stdout, "done", p, time.Since(start))
	for _, ref := range p.Unreadable {
		fmt.Fprintf(env.Stdout, "unreadable: %s\n", ref)
	}
	for _, ref := range p.Failed {
		fmt.Fprintf(env.Stdout, "failed: %s\n", ref)
	}
	switch {
	case err != nil && errors.Is(err, ctx.Err()):
		return fmt.Errorf("interrupted after %d records; run it again to resume", p.Scanned)
	case err != nil:
		return err
	case len(p.Unreadable) > 0 || len(p.Failed) > 0:
		return fmt.Errorf("%d record(s) cannot be opened with any key of %s and %d could not be rewritten (listed above): "+
			"add the key that sealed them, or replace their credentials with PUT or delete them; run reseal again for the others",
			len(p.Unreadable), secrets.EnvKeys, len(p.Failed))
	}
	return nil
}

func printResealProgress(w io.Writer, what string, p state.ResealProgress, took time.Duration) {
	fmt.Fprintf(w, "reseal: %s: shard %d/%d scanned=%d resealed=%d current=%d unreadable=%d failed=%d elapsed=%s\n",
		what, min(p.Shard+1, p.Shards), p.Shards, p.Scanned, p.Resealed, p.Current, len(p.Unreadable), len(p.Failed),
		took.Round(time.Millisecond))
}
