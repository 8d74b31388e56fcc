#!/usr/bin/env python3
"""Is this change faster? Two revisions of convey, interleaved on one bed (root only).

    sudo .venv/bin/python bench/ab_revisions.py --base REV [--mode passthrough|dsr|proxy] [--offload]
                                                [--workers N] [--pairs N] [--seconds N] [--concurrency N]

Connection rates on the development VM swing by up to +-40% between runs, and by 10-20% within one (bench/README.md):
two figures taken minutes apart say little about a change worth 5%. This runs the same short-connection load
(``bench/loadgen.c``, as bench/sustained.py) through ``--base`` (any git revision, checked out into a temporary
worktree) and through the working tree, ``--pairs`` times, alternating which goes first (A B, B A, ...), each
measurement with a fresh convey process (the real command, ``--install-rules``) and a flushed conntrack table. It
prints every measurement, then the medians, the median of the per-pair ratios with their range, and how many pairs
the working tree won: a change that wins 10 of 10 pairs is faster; one that wins 5 is noise.

Each convey runs from its own tree (``PYTHONPATH`` = the tree and ``PYTHONSAFEPATH=1``, so the current directory
does not put the working tree first). The bed, the load generators and this script are the working tree's. The
namespaces, every process in them and the worktree are removed on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib import l4  # noqa: E402
from bench.lib.cpu import cpu_seconds, process_tree  # noqa: E402
from bench.sustained import (  # noqa: E402
    VIP_PORT,
    add_load_options,
    check_load_options,
    config_text,
    load_bed,
    run_as_root,
)
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess  # noqa: E402


@dataclass
class Variant:
    label: str
    tree: Path
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0


def checkout(rev: str, into: Path) -> Path:
    """``rev`` in a detached worktree under ``into`` (SystemExit with git's message when it is no revision)."""
    tree = into / "base"
    done = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"git worktree add {rev} failed: {done.stderr.strip()}")
    return tree


def remove_worktree(tree: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True, check=False
    )


def measure(bed: Testbed, tools: l4.Tools, variant: Variant, args: argparse.Namespace) -> str:
    if args.offload and args.mode == "passthrough":
        l4.flush_conntrack(bed.lb)  # what the other variant left behind must not meet this one
    env = {"PYTHONPATH": str(variant.tree), "PYTHONSAFEPATH": "1"}
    text = config_text(bed, args.mode, args.offload, args.workers)
    convey = ConveyProcess(bed, text, mode=args.mode, name=f"ab-{variant.label}", extra_env=env).start()
    try:
        assert convey.proc is not None
        pids = process_tree(convey.proc.pid)
        before = cpu_seconds(pids)
        result = l4.conns(
            tools, bed.client, bed.vip, VIP_PORT, args.seconds, args.concurrency, l4.MAX_CONNECTIONS, 1.0
        )
        used = cpu_seconds(pids) - before
    finally:
        convey.stop()
    us = used / max(1, result.started) * 1e6
    variant.rates.append(result.per_second)
    variant.cpu_us.append(us)
    variant.errors += result.errors
    return f"{result.per_second:,.0f} conn/s, {result.errors} errors, convey {us:.0f} us CPU/conn"


def spread(values: list[float]) -> str:
    mid = statistics.median(values)
    return f"{min(values) / mid - 1:+.0%}/{max(values) / mid - 1:+.0%}" if mid else "-"


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="convey-ab-") as scratch:
        base = Variant("base", checkout(args.base, Path(scratch)))
        head = Variant("working tree", REPO)
        try:
            with load_bed(args.mode) as (bed, tools):
                what = f"{args.mode}{' offload' if args.offload else ''}, {args.workers} worker(s)"
                print(f"A/B ({what}): base = {args.base}, B = the working tree; {args.pairs} pairs of "
                      f"{args.seconds:g} s, {args.concurrency} connections in flight", flush=True)  # fmt: skip
                for pair in range(args.pairs):
                    order = (base, head) if pair % 2 == 0 else (head, base)
                    for variant in order:
                        print(
                            f"  pair {pair + 1} {variant.label}: {measure(bed, tools, variant, args)}",
                            flush=True,
                        )
        finally:
            remove_worktree(base.tree)
    ratios = [b / a for a, b in zip(base.rates, head.rates, strict=True) if a > 0]
    print()
    print("| revision | conn/s median (spread) | convey CPU us/conn median | errors |")
    print("|---|---:|---:|---:|")
    for v in (base, head):
        print(f"| {v.label} | {statistics.median(v.rates):,.0f} ({spread(v.rates)}) | "
              f"{statistics.median(v.cpu_us):.0f} | {v.errors} |")  # fmt: skip
    wins = sum(r > 1 for r in ratios)
    print(f"\nworking tree / base, per pair: median {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}x); the working tree won {wins} of {len(ratios)} pairs; "
          f"CPU per connection {statistics.median(head.cpu_us) / statistics.median(base.cpu_us):.2f}x")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    add_load_options(parser, 6.0)
    parser.add_argument("--pairs", type=int, default=10, help="interleaved pairs (default 10)")
    args = parser.parse_args(argv)
    check_load_options(parser, args)
    if not 1 <= args.pairs <= 40:
        parser.error("--pairs must be 1..40")
    return run_as_root("bench/ab_revisions.py", run, args)  # the worktree goes with the bed (run's finally)


if __name__ == "__main__":
    sys.exit(main())
