#!/usr/bin/env bash
# The test command of the README: installs what the tests talk to when it is
# missing (scripts/install-tools.sh: redis-server; promtool, docker-compose
# and chromium for the deployment and browser checks; no service is left
# running), then runs every test with the race detector. Tests start their
# own private redis-servers on free loopback ports; a Redis already running
# on 6379 is neither needed nor touched. VAULTFLEET_SKIP_TOOLS=1 installs
# nothing (a machine without apt) and skips the checks that need the tools.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${VAULTFLEET_SKIP_TOOLS:-}" == "1" ]]; then
	echo "test: VAULTFLEET_SKIP_TOOLS=1: installing nothing; the promtool, docker-compose and Chromium checks skip"
	command -v redis-server >/dev/null || echo "test: no redis-server: miniredis stands in (install redis-server for the real thing)"
else
	scripts/install-tools.sh
fi

mkdir -p artifacts
# -timeout: the fault suite (internal/faults) runs real fleets through
# eleven faults, about 6-8 minutes on 2 cores beside the other packages;
# go test's default of 10 minutes per package is too close.
exec go test -race -count=1 -timeout 30m "$@" ./...
