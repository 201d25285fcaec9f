#!/usr/bin/env bash
# Installs with apt-get what the tests talk to, when it is missing:
# redis-server; promtool and prometheus (package prometheus), docker-compose
# and chromium for the deployment and browser checks. Called by
# scripts/test.sh; VAULTFLEET_SKIP_TOOLS=1 there skips those checks on a
# machine without apt.
#
# The prometheus package ships a service that Debian enables and starts on
# install; the tests only need its binaries. A policy-rc.d that denies
# every start keeps it (and any other service of these packages) from
# starting during the install, and the prometheus service is disabled and
# stopped afterwards, so a developer's machine does not end up running a
# Prometheus server. VAULTFLEET_POLICY_RC_D names the policy file (default
# /usr/sbin/policy-rc.d; one that exists already is left alone).
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
# redis-cli creates the local Redis Cluster of the *_cluster_test.go files.
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
((${#need[@]})) || exit 0

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
policy="${VAULTFLEET_POLICY_RC_D:-/usr/sbin/policy-rc.d}"
if [[ ! -e "$policy" ]]; then
	printf '#!/bin/sh\n# scripts/install-tools.sh: no service starts while the test tools install\nexit 101\n' |
		$sudo tee "$policy" >/dev/null
	$sudo chmod 755 "$policy"
	trap '$sudo rm -f "$policy"' EXIT
fi

echo "test: installing ${need[*]} with apt-get (services kept from starting)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
	# Enabled by the package's postinst even when policy-rc.d kept it from
	# starting: turn it off for good (no error when systemd is not running).
	$sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
