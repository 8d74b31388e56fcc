#!/usr/bin/env bash
# Install the Debian packages convey's tests, demo and benchmarks need, only those that are missing.
set -euo pipefail
packages=(iptables nftables iproute2 kmod libnetfilter-queue-dev libnfnetlink-dev build-essential python3-venv
          python3-dev curl haproxy tcpdump procps iperf3
          chromium  # chromium: tests/e2e/test_page_browser.py (the live page in a headless browser)
          bird2)  # bird2: convey's BGP speaker ([bgp], docs/scale-out.md) and the router of tests/cluster/
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# bird2's package enables (and would start) the system's own bird.service: convey starts its own BIRD, and that
# one must never run on this host's network. Its start is refused during the install (a policy-rc.d, unless the
# machine has one), and the service is disabled whenever systemd runs.
no_system_bird() {
  if [ -d /run/systemd/system ] && systemctl is-enabled --quiet bird.service 2>/dev/null; then
    echo "disabling the system's bird.service (convey runs BIRD itself)"
    systemctl disable --now bird.service
  fi
}
if [ ${#missing[@]} -eq 0 ]; then
  [ "$(id -u)" -ne 0 ] || no_system_bird
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them as root: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
policy=/usr/sbin/policy-rc.d
if [[ " ${missing[*]} " == *" bird2 "* && ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"  # no service starts during this install
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
no_system_bird
