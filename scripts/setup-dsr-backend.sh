#!/usr/bin/env bash
# Prepare a server for convey's DSR mode (run on the server, as root, in its network namespace):
#   rewrite "ip":  an egress NAT that puts VIP:PORT back as the source of the server's replies, except the
#                  replies to the balancer's health checks (--balancer, required)
#                  (tc act_nat where the kernel has it, an nftables stateless rule otherwise; --method to choose)
#   rewrite "mac": the VIP on lo, arp_ignore=1 / arp_announce=2
#
#   scripts/setup-dsr-backend.sh install --vip VIP --port PORT --balancer LB_ADDR [--rewrite ip|mac]
#                                [--server-port PORT] [--dev IFACE] [--method auto|tc|nft] [--server-addr ADDR]
#   scripts/setup-dsr-backend.sh remove --vip VIP --port PORT
#   scripts/setup-dsr-backend.sh show
#   scripts/setup-dsr-backend.sh --help
#
# Idempotent; `remove` restores exactly what `install` changed. A thin wrapper around
# `python -m convey.backend` (docs/dsr.md): it uses the repository's virtualenv when there is one. Installed with
# pip (pip install 'convey[backend]'), the same tool is the command convey-backend, with the same arguments.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

if [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
elif command -v python3 >/dev/null 2>&1; then
    python="$(command -v python3)"
else
    echo "setup-dsr-backend: no python3 found (and no $repo/.venv)" >&2
    exit 1
fi

wants_help=0
for arg in "$@"; do
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && wants_help=1
done
if [[ $wants_help -eq 0 && "$(id -u)" -ne 0 ]]; then
    echo "setup-dsr-backend: must run as root (it changes sysctls, addresses, tc or nftables)" >&2
    exit 1
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m convey.backend "$@"
