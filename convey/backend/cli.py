"""The backend tool's command line: ``convey-backend`` (installed with convey), ``python -m convey.backend``, or
scripts/setup-dsr-backend.sh in a checkout.

Errors are one line on stderr, never a traceback: exit status 1 for what the kernel or the system refused, 2 for
incomplete or contradictory arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from convey.backend.state import Entry, Method, UsageError
from convey.errors import ConveyError
from convey.modes import Rewrite

PROG = "setup-dsr-backend"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="setup-dsr-backend.sh",
        description="Prepare (or unprepare) this server for convey's DSR mode, in the current network namespace. "
        'rewrite "ip": an egress NAT putting VIP:PORT back as the source of the replies (tc act_nat or '
        'nftables); rewrite "mac": the VIP on lo with ARP announcements suppressed. Idempotent; remove '
        "restores exactly what install changed. Needs root.",
    )
    p.add_argument("action", choices=("install", "remove", "show"))
    p.add_argument("--vip", help="the virtual IP clients connect to (required for install and remove)")
    p.add_argument("--port", type=int, help="the VIP's port (required for install and remove)")
    p.add_argument(
        "--server-port",
        type=int,
        help="the port this server listens on, when it differs from --port (rewrite ip; needs nft)",
    )
    p.add_argument(
        "--rewrite", default=Rewrite.IP, choices=tuple(Rewrite), help="the balancer's [dsr] rewrite [ip]"
    )
    p.add_argument(
        "--dev",
        help="the interface the replies leave by (ip) / that must not answer ARP for the VIP (mac) "
        "[the default route's interface, or the only one with an address]",
    )
    p.add_argument(
        "--method",
        default=Method.AUTO,
        choices=tuple(Method),
        help="egress NAT for rewrite ip: tc (act_nat), nft, or auto (tc when possible) [auto]",
    )
    p.add_argument(
        "--server-addr", help="this server's address the balancer sends to [the first address of --dev]"
    )
    p.add_argument(
        "--balancer",
        action="append",
        default=[],
        metavar="ADDR",
        help="the address the balancer health-checks this server from: replies to it keep the server's "
        "address (required for rewrite ip; repeat it for each balancer)",
    )
    p.add_argument("--state-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _plan(args: argparse.Namespace) -> Entry:
    from convey.backend import prepare

    return prepare.plan(
        args.rewrite,
        args.vip,
        args.port,
        args.server_port,
        args.dev,
        args.method,
        args.server_addr,
        args.balancer,
    )


def _run(args: argparse.Namespace, entry: Entry | None) -> list[str]:
    from convey.backend import prepare

    if args.action == "show":
        return prepare.show(args.state_dir)
    if args.action == "remove":
        return prepare.remove(args.vip, args.port, args.state_dir)
    assert entry is not None
    return prepare.install(entry, args.state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Arguments are checked before root is: an incomplete command is refused the same way for anyone."""
    args = parser().parse_args(argv)
    if args.action != "show" and (args.vip is None or args.port is None):
        print(f"{PROG}: {args.action} needs --vip and --port", file=sys.stderr)
        return EXIT_USAGE
    try:
        entry = _plan(args) if args.action == "install" else None
        if os.geteuid() != 0:
            print(
                f"{PROG}: must run as root (it changes sysctls, addresses, tc or nftables)", file=sys.stderr
            )
            return EXIT_ERROR
        lines = _run(args, entry)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ConveyError, OSError) as exc:
        print(f"{PROG}: {args.action} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ImportError as exc:
        print(
            f"{PROG}: {exc.name or exc} is missing: pip install 'convey[backend]' (tc needs pyroute2), "
            "or use --method nft",
            file=sys.stderr,
        )
        return EXIT_ERROR
    for line in lines:
        print(line)
    return EXIT_OK
