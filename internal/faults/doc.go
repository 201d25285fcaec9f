// Package faults is vaultfleet's fault suite: it builds the vaultfleet
// binary, runs a real fleet (schedulers, workers, serve, redis-server with
// AOF, Redis Sentinel) against in-test providers that behave like real
// ones, injects faults (kill -9, rolling SIGTERM, Redis outages and
// failovers, slow Redis, provider outages and auth incidents, operator
// misconfiguration, key rotation, webhook receiver outages) and measures
// what was lost. Everything lives in the package's tests; see README.md.
//
//	go test ./internal/faults                          # short form (CI)
//	VAULTFLEET_FAULTS=full go test -timeout 60m ./internal/faults
package faults
