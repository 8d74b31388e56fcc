"""``python -m testbed clean|list``: remove or list leftover test namespaces (``make clean-netns``)."""

from __future__ import annotations

import argparse
import os
import sys

from pyroute2 import netns

from testbed.namespaces import PREFIX, cleanup_leftovers, namespace_pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed", description="convey's namespace test bed")
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser("clean", help="delete leftover test namespaces and kill the processes inside them")
    clean.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    sub.add_parser("list", help="list test namespaces")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(netns.listnetns()):
            if name.startswith(PREFIX):
                print(name, " ".join(map(str, namespace_pids(name))))
        return 0
    if os.geteuid() != 0:
        print("clean needs root", file=sys.stderr)
        return 1
    for name in cleanup_leftovers(args.prefix):
        print(f"removed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
