#!/usr/bin/env python3
"""Sustained load: does one convey process slow down as connections pile up behind it? (root only)

    sudo .venv/bin/python bench/sustained.py [--mode passthrough|dsr|proxy] [--offload] [--workers N]
                                             [--rounds N] [--seconds N] [--concurrency N]

The other benchmarks start a fresh convey for every row and make a few tens of thousands of connections with it;
a balancer in service makes millions. This one starts a single convey (the real command, as bench/packet.py's and
bench/dsr.py's rows do) and runs ``--rounds`` back-to-back rounds of short connections through it
(``bench/loadgen.c``: connect, 32-byte request, 32-byte reply, the server closes first), printing after each round
the connection rate, convey's CPU time per connection (every process of a ``--workers`` run), its resident memory
and the connections counted so far. A convey that keeps something per connection, or whose work per connection
grows with what it has seen, shows it here as a rising CPU column.

Measured with it (bench/README.md, "a slowdown under sustained load"): passthrough offload's bounded memories of
closed connections were plain dicts evicted from the front, and its CPU per connection went from ~120 to ~300 us
within a minute (once 65,536 connections had closed); fixed, it stays flat over 366,000 connections.

Per packet passthrough (``--mode passthrough`` without ``--offload``) sustains about 440 new connections/s per
server and source address (docs/modes.md, ephemeral ports): above that its rounds end in refusals (the ``errors``
column, /stats ``no_port``), which is its port policy, not a slowdown.

The load generators share the CPUs with convey: compare the rounds of one run. Every load loop is bounded in time
and count; the namespaces and every process in them are removed on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import dsr  # noqa: E402
from bench.lib import l4, procs  # noqa: E402
from bench.lib.cpu import cpu_seconds, process_tree  # noqa: E402
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess  # noqa: E402

SERVER_PORT = 8080
VIP_PORT = 80


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def config_text(bed: Testbed, mode: str, offload: bool, workers: int) -> str:
    """Passthrough and proxy: the bed's frontend on the VIP; DSR: bench/dsr.py's config (``rewrite = "ip"``)."""
    if mode == "dsr":
        return dsr.config_text(bed, "ip", offload) + f"workers = {workers}\n"  # its last section is [dsr]
    extra = []
    if mode == "passthrough":
        extra += ["[passthrough]", f"workers = {workers}"] + (["offload = true"] if offload else [])
    elif workers > 1:
        extra += ["[proxy]", f"workers = {workers}"]
    return bed.config_toml(mode, VIP_PORT, SERVER_PORT, "\n".join(extra))


def counted(doc: dict[str, Any]) -> int:
    return int(doc.get("total_connections", 0))


@contextlib.contextmanager
def load_bed(mode: str) -> Iterator[tuple[Testbed, l4.Tools]]:
    """A bed with short-connection servers for ``mode`` (DSR: bench/dsr.py's L2 bed with ``rewrite = "ip"``),
    removed with every process in it on the way out."""
    dsr_mode = mode == "dsr"
    bed = Testbed.create(kind="l2" if dsr_mode else "routed", servers=2)
    ports: list[int] = []
    try:
        tools = l4.Tools.find(bed.logdir)
        l4.no_time_wait(bed.servers)
        if dsr_mode:
            for server in bed.servers:
                l4.start_rr_server(tools, server, "0.0.0.0", dsr.IP_SERVER_PORT)
            # the DSR config's other backend (bench/dsr.py's bulk frontend)
            l4.start_bulk_server(tools, bed.servers[0], "0.0.0.0", dsr.BULK_PORT)
            ports = dsr.prepare(bed, "ip")
        else:
            for server in bed.servers:
                l4.start_rr_server(tools, server, server.addr, SERVER_PORT)
        yield bed, tools
    finally:
        if ports:
            dsr.unprepare(bed, ports)
        bed.destroy()


def run(args: argparse.Namespace) -> int:
    per_conn: list[float] = []
    with load_bed(args.mode) as (bed, tools):
        convey = ConveyProcess(
            bed, config_text(bed, args.mode, args.offload, args.workers), mode=args.mode, name="sustained"
        ).start()
        assert convey.proc is not None
        pid = convey.proc.pid
        what = f"{args.mode}{' offload' if args.offload else ''}, {args.workers} worker(s)"
        print(f"sustained load through one convey ({what}): {args.rounds} rounds of {args.seconds:g} s, "
              f"{args.concurrency} connections in flight", file=sys.stderr)  # fmt: skip
        print("| round | conn/s | errors | convey CPU us/conn | convey RSS MiB | connections counted |")
        print("|---:|---:|---:|---:|---:|---:|")
        for index in range(args.rounds):
            pids = process_tree(pid)
            before = cpu_seconds(pids)
            result = l4.conns(
                tools, bed.client, bed.vip, VIP_PORT, args.seconds, args.concurrency, l4.MAX_CONNECTIONS, 1.0
            )
            used = cpu_seconds(pids) - before
            us = used / max(1, result.started) * 1e6
            per_conn.append(us)
            doc = convey.stats(timeout=60)
            print(f"| {index + 1} | {result.per_second:,.0f} | {result.errors} | {us:.0f} | "
                  f"{rss_mib(process_tree(pid)):.0f} | {counted(doc):,} |", flush=True)  # fmt: skip
        convey.stop()
    if len(per_conn) >= 4:
        early = statistics.median(per_conn[1:3])  # the first round warms up
        late = statistics.median(per_conn[-2:])
        print(f"\nCPU per connection, last two rounds / rounds 2-3: {late / early:.2f}x "
              f"({early:.0f} -> {late:.0f} us; a flat convey reads ~1.0x, the rounds swing ±15% on a shared VM)")  # fmt: skip
    return 0


def add_load_options(parser: argparse.ArgumentParser, seconds: float) -> None:
    """The options of a short-connection load through one convey (this script's and bench/ab_revisions.py's)."""
    parser.add_argument("--mode", choices=("passthrough", "dsr", "proxy"), default="passthrough")
    parser.add_argument("--offload", action="store_true", help="flow offload (passthrough and dsr)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--seconds", type=float, default=seconds, help=f"each window (default {seconds:g})")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in flight (default 32)")


def check_load_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.5 <= args.seconds <= 30 or not 1 <= args.workers <= 8:
        parser.error("--seconds must be 0.5..30, --workers 1..8")
    if args.offload and args.mode == "proxy":
        parser.error("--offload is for --mode passthrough or dsr")


def run_as_root(script: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` as root, with SIGTERM as Ctrl-C (the bed is removed either way)."""
    if os.geteuid() != 0:
        print(f"{script} builds network namespaces: run it as root", file=sys.stderr)
        return 1
    procs.interrupt_on_sigterm()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_options(parser, 5.0)
    parser.add_argument("--rounds", type=int, default=10, help="back-to-back rounds (default 10)")
    args = parser.parse_args(argv)
    check_load_options(parser, args)
    if not 1 <= args.rounds <= 60:
        parser.error("--rounds must be 1..60")
    return run_as_root("bench/sustained.py", run, args)


if __name__ == "__main__":
    sys.exit(main())
