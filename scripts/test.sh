#!/usr/bin/env bash
# The test command of the README: installs what the tests talk to when it is
# missing (redis-server; promtool, docker-compose and chromium for the
# deployment and browser checks), then runs every test with the race
# detector. Tests start their own private redis-servers on free loopback
# ports; a Redis already running on 6379 is neither needed nor touched.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
	sudo=""
	[[ $(id -u) -eq 0 ]] || sudo="sudo"
	echo "test: installing ${need[*]} with apt-get"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p artifacts
exec go test -race -count=1 "$@" ./...
