#!/usr/bin/env bash
# Install the Debian packages convey's tests, demo and benchmarks need, only those that are missing.
set -euo pipefail
packages=(iptables nftables iproute2 kmod libnetfilter-queue-dev libnfnetlink-dev build-essential python3-venv
          python3-dev curl haproxy tcpdump procps iperf3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
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
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
