#!/usr/bin/env python3
"""Packet-path benchmark: kernel NAT, convey passthrough per packet and with flow offload, side by side (root only).

    sudo .venv/bin/python bench/packet.py [--quick] [--seconds N] [--rounds N] [--no-offload] [--no-dsr]
                                          [--verdict-thread] [--keep-time-wait] [--json FILE]

Builds a routed namespace test bed (testbed/: client -- lb -- two servers, all in 198.18.0.0/15; the host's own
namespace is never touched) and measures, rows interleaved A/B/A/B (the order alternating every round), on the
same bed and the same servers:

* **kernel NAT**: plain iptables DNAT (``statistic nth`` over the two servers) + SNAT (to the balancer's address
  on each server's segment, convey's port range) in the balancer's namespace, no convey: the baseline of issue 8's
  targets (offload bulk >= 0.9x kernel NAT, offload connections/s >= 0.7x kernel NAT).
* **passthrough per-packet**: ``convey --passthrough --install-rules``: every packet both ways through NFQUEUE.
* **passthrough offload**: ``convey --passthrough --offload --install-rules`` (``[passthrough] offload = true``):
  only a connection's first packet reaches convey, conntrack NAT carries the rest. Skipped with ``--no-offload``
  (a kernel without conntrack), and skipped with convey's own message when it refuses to start. With
  ``--verdict-thread`` also the same with its verdicts sent by a thread of their own
  (``CONVEY_OFFLOAD_VERDICTS=thread``; see convey/dataplane/verdict_sender.py): what that thread buys.
* **kernel forwarding** (full run only): plain routing, the client talks to the server directly: the ceiling.
* **accept-only loop**: convey's per-packet rules with a tiny program bound to the queue that only accepts: the
  packets/s ceiling of any userspace verdict path (bench/lib's ``accept_only`` role).

Measures (bench/lib/l4.py): bulk Gbit/s up and down (``iperf3 -t N`` and ``-R``, one stream; a Python fallback
without iperf3, and the output says so), connections/s (``bench/loadgen.c``, compiled at run time: 32 in flight,
connect, 32-byte request, 32-byte reply, the server closes first) and, for convey's rows, the packets that
reached convey (its /stats verdict counters) per connection and per MB downloaded. For the accept-only loop and
per-packet convey also packets/s under a blast of prebuilt frames (ACK|PSH, 17 bytes of payload, 64 established
connections client -> VIP written to an AF_PACKET socket as fast as one Python loop can; a drop rule matching
exactly that IP length ends every blasted packet right after its verdict; the verdict process pinned to the last
CPU, the blaster to the first), with the verdict process's CPU time per packet and the kernel's queue drops.

The servers run without TIME_WAIT (``tcp_max_tw_buckets = 0``; ``--keep-time-wait`` to keep it): through source
NAT a row would otherwise inherit the previous rows' TIME_WAIT tuples and stall on 1 s SYN retries (see
bench/lib/l4.py's ``no_time_wait``).

Prints a table (medians over the rounds, ``±`` half the spread) and the ratios offload / kernel NAT, per-packet /
kernel NAT and offload / per-packet; then, unless ``--no-dsr``, bench/dsr.py's DSR part on an L2 bed. Every load
loop is bounded in count and time; every process and namespace is removed on exit, on failure and on Ctrl-C. The
load generators share the CPUs with what they measure: compare ratios from one run, not absolute figures across
runs or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib import blast, l4, procs  # noqa: E402
from bench.lib.procs import ask, spawn_in, stop  # noqa: E402
from bench.lib.rounds import Series, progress  # noqa: E402
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess, ConveyProcessError  # noqa: E402
from testbed.process import python_env  # noqa: E402

VIP_WEB_PORT = 80  # frontend for short connections -> every server's RR_PORT
RR_PORT = 8080
BULK_PORT = (
    l4.IPERF_PORT
)  # frontend for bulk -> server 0 only (iperf3's control and data connections together)
SERVERS = 2
PORT_RANGE = (
    33768,
    61000,
)  # convey's default [passthrough] port_range; the kernel NAT row's SNAT uses it too
# per-packet convey: connections per run within its fresh ephemeral ports (it reuses none for port_reuse_delay)
PER_PACKET_MAX_CONNECTIONS = 40_000

KERNEL_FWD = "kernel forwarding"
KERNEL_NAT = "kernel NAT"
ACCEPT_ONLY = "accept-only loop"
PER_PACKET = "passthrough per-packet"
OFFLOAD = "passthrough offload"
OFFLOAD_THREAD = "offload, verdict thread"
OFFLOAD_NO_ACCOUNTING = "offload, accounting off"


def per_packet_workers(count: int) -> str:
    return f"per-packet, {count} workers"


def offload_workers(count: int) -> str:
    return f"offload, {count} workers"


ROW_ORDER = (KERNEL_FWD, KERNEL_NAT, ACCEPT_ONLY, PER_PACKET, *(per_packet_workers(n) for n in range(2, 9)),
             OFFLOAD, *(offload_workers(n) for n in range(2, 9)), OFFLOAD_THREAD,
             OFFLOAD_NO_ACCOUNTING)  # fmt: skip
WORKER_TARGETS = {l4.CONNS: 1.6}  # per-packet with 2 workers / with 1, issue 9
TARGETS = {l4.UP: 0.9, l4.DOWN: 0.9, l4.CONNS: 0.7}  # offload / kernel NAT, issue 8


# ---------------------------------------------------------------------------------------------------------------
# the bed and the data paths
# ---------------------------------------------------------------------------------------------------------------


def config_text(bed: Testbed, offload: bool = False, workers: int = 1) -> str:
    lines = [
        "[frontends.web]",
        f'listen_addr = "{bed.vip}:{VIP_WEB_PORT}"',
        'backend = "rr"',
        "[frontends.bulk]",
        f'listen_addr = "{bed.vip}:{BULK_PORT}"',
        'backend = "bulk"',
        "[backends.rr]",
        "health_check_interval = 2",
    ]
    for i, server in enumerate(bed.servers):
        lines += [f"[backends.rr.servers.s{i}]", f'addr = "{server.addr}:{RR_PORT}"']
    lines += [
        "[backends.bulk]",
        "health_check_interval = 2",
        "[backends.bulk.servers.s0]",
        f'addr = "{bed.servers[0].addr}:{BULK_PORT}"',
        "[passthrough]",
        "fin_linger = 0.5",
        f"port_range = [{PORT_RANGE[0]}, {PORT_RANGE[1]}]",
    ]
    if offload:
        lines.append("offload = true  # = convey --passthrough --offload")
    if workers > 1:
        lines.append(f"workers = {workers}")
    return "\n".join(lines) + "\n"


class DataPath:
    """One way through the balancer namespace. ``target(service)`` is where clients connect."""

    name = "?"
    pps = False  # measured under the frame blast too
    l4 = True  # measured with bulk and connections/s

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_WEB_PORT if service == "rr" else BULK_PORT

    def verdicts(self) -> int | None:
        """Packets given a verdict so far (None: no userspace verdicts on this path)."""
        return None

    def cpu_pid(self) -> int | None:
        return None

    def stats(self) -> dict[str, Any] | None:
        return None

    @property
    def pid(self) -> int:
        """The process giving the verdicts."""
        raise NotImplementedError

    def prepare_blast(self) -> None:
        """Before a blast: make the blasted flows whatever this path needs them to be."""

    def end_blast(self) -> None:
        """After a blast."""

    def close(self) -> None:
        pass


class KernelPath(DataPath):
    """Plain routing through the balancer namespace: no rule, no queue; the client talks to server 0."""

    name = KERNEL_FWD

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.servers[0].addr, RR_PORT if service == "rr" else BULK_PORT


class KernelNatPath(DataPath):
    """iptables DNAT + SNAT in the balancer namespace, in chains of its own (removed exactly at close)."""

    name = KERNEL_NAT
    CHAINS = (("PREROUTING", "CVYBENCH-PRE"), ("POSTROUTING", "CVYBENCH-POST"))

    def __init__(self, bed: Testbed) -> None:
        super().__init__(bed)
        l4.flush_conntrack(bed.lb)
        vip, n = bed.vip, len(bed.servers)
        lines = ["*nat", ":CVYBENCH-PRE - [0:0]", ":CVYBENCH-POST - [0:0]"]
        for i, server in enumerate(bed.servers):
            nth = f"-m statistic --mode nth --every {n - i} --packet 0 " if i < n - 1 else ""
            lines.append(f"-A CVYBENCH-PRE -d {vip}/32 -p tcp -m tcp --dport {VIP_WEB_PORT} {nth}"
                         f"-j DNAT --to-destination {server.addr}:{RR_PORT}")  # fmt: skip
        lines.append(f"-A CVYBENCH-PRE -d {vip}/32 -p tcp -m tcp --dport {BULK_PORT} "
                     f"-j DNAT --to-destination {bed.servers[0].addr}:{BULK_PORT}")  # fmt: skip
        for i, server in enumerate(bed.servers):
            lines.append(f"-A CVYBENCH-POST -d {server.addr}/32 -p tcp -j SNAT --to-source "
                         f"{bed.lb_addr_towards(i)}:{PORT_RANGE[0]}-{PORT_RANGE[1]}")  # fmt: skip
        lines += [f"-A {hook} -j {chain}" for hook, chain in self.CHAINS]
        bed.lb.run(["iptables-restore", "--noflush"], input="\n".join([*lines, "COMMIT", ""]))

    def close(self) -> None:
        for hook, chain in self.CHAINS:
            self.bed.lb.run(["iptables", "-t", "nat", "-D", hook, "-j", chain], check=False)
            self.bed.lb.run(["iptables", "-t", "nat", "-F", chain], check=False)
            self.bed.lb.run(["iptables", "-t", "nat", "-X", chain], check=False)


class AcceptOnlyPath(DataPath):
    """convey's rules (installed with ``convey rules install``), with the accept-only loop bound to the queue."""

    name = ACCEPT_ONLY
    pps = True
    l4 = False

    def __init__(self, bed: Testbed, max_seconds: float) -> None:
        super().__init__(bed)
        self.config = bed.logdir / "accept-only.toml"
        self.config.write_text(config_text(bed))
        self._rules("install", "--passthrough")
        self.proc: subprocess.Popen[bytes] | None = spawn_in(
            bed.lb, "accept_only", 0, max_seconds, stdin=True
        )

    def verdicts(self) -> int:
        assert self.proc is not None
        return int(ask(self.proc, "count", 60))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _rules(self, *action: str) -> None:
        self.bed.lb.run(
            [sys.executable, "-m", "convey", "rules", *action, f"--config={self.config}"], env=python_env()
        )

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
            self._rules("remove")


class ConveyPath(DataPath):
    """The real ``convey --passthrough [--offload] --install-rules`` process."""

    def __init__(
        self,
        bed: Testbed,
        offload: bool = False,
        verdict_thread: bool = False,
        workers: int = 1,
        accounting: bool = True,
    ) -> None:
        super().__init__(bed)
        self.offload = offload
        self.workers = workers
        self.name = (OFFLOAD_THREAD if verdict_thread else OFFLOAD) if offload else PER_PACKET
        if not accounting:
            self.name = OFFLOAD_NO_ACCOUNTING
        # the blast's packets/s and CPU per packet are measured for one process
        self.pps = not offload and workers == 1
        if workers > 1:
            self.name = offload_workers(workers) if offload else per_packet_workers(workers)
        if offload:
            l4.flush_conntrack(bed.lb)
        name = "bench-offload" if offload else "bench-convey"
        try:
            env = {"CONVEY_OFFLOAD_VERDICTS": "thread"} if verdict_thread else {}
            if not accounting:  # measurement only: no conntrack events, nothing counted (see accounting_on)
                env["CONVEY_OFFLOAD_ACCOUNTING"] = "off"
            text = config_text(bed, offload, workers)
            self.convey: Any = ConveyProcess(bed, text, name=name, extra_env=env).start()
        except ConveyProcessError as exc:
            if offload:
                raise l4.Skip(f"convey --passthrough --offload refused to start: {l4.refusal(exc)}") from None
            raise
        self._flows: subprocess.Popen[bytes] | None = None

    def verdicts(self) -> int:
        return l4.verdict_count(self.convey.stats(timeout=60))

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.convey.stats(timeout=60)
        return doc

    def cpu_pid(self) -> int | None:
        return self.pid  # with workers: the supervisor; its worker processes are counted with it

    @property
    def pid(self) -> int:
        return int(self.convey.proc.pid)

    def prepare_blast(self) -> None:
        """The blasted connections, established through convey, so every frame is a packet of a known flow."""
        self._flows = spawn_in(self.bed.client, "flows", self.bed.vip, VIP_WEB_PORT, blast.BLAST_SPORT, blast.BLAST_FLOWS, 120,
                               stdin=True)  # fmt: skip
        flows = self.convey.stats()["packet"]["flows"]
        if flows < blast.BLAST_FLOWS:
            raise RuntimeError(f"convey tracks {flows} flows, expected at least {blast.BLAST_FLOWS}")

    def end_blast(self) -> None:
        if self._flows is not None:
            ask(self._flows, "stop", 20)
            self._flows.wait(10)
            self._flows = None

    def close(self) -> None:
        self.end_blast()
        self.convey.stop()


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    series: Series = field(default_factory=Series)
    pps: dict[str, list[blast.Pps]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tools: list[str] = field(default_factory=list)


def bench(args: argparse.Namespace) -> Results:
    results = Results()
    bed = Testbed.create(kind="routed", servers=SERVERS)
    try:
        tools = l4.Tools.find(bed.logdir)
        results.tools = tools.describe()
        if not args.keep_time_wait:
            l4.no_time_wait(bed.servers)
        for server in bed.servers:
            l4.start_rr_server(tools, server, server.addr, RR_PORT)
        l4.start_bulk_server(tools, bed.servers[0], bed.servers[0].addr, BULK_PORT)
        # blasted packets die right after the verdict, the same way on every path
        for chain in ("INPUT", "FORWARD"):
            bed.lb.run(["iptables", "-A", chain, "-p", "tcp", "-m", "length", "--length", str(blast.BLAST_LENGTH),
                        "-j", "DROP"])  # fmt: skip
        frames = blast.blast_frames(bed, VIP_WEB_PORT)
        load = l4.Load(args.seconds, args.warmup, args.concurrency)
        say = progress()

        rows: list[tuple[str, Callable[[], l4.Row]]] = []
        if not args.quick:
            rows.append((KERNEL_FWD, lambda: KernelPath(bed)))
        rows += [
            (KERNEL_NAT, lambda: KernelNatPath(bed)),
            (ACCEPT_ONLY, lambda: AcceptOnlyPath(bed, 600)),
            (PER_PACKET, lambda: ConveyPath(bed)),
        ]
        if args.workers > 1:
            rows.append((per_packet_workers(args.workers), lambda: ConveyPath(bed, workers=args.workers)))
        if args.no_offload:
            results.skipped[OFFLOAD] = "--no-offload"
        else:
            rows.append((OFFLOAD, lambda: ConveyPath(bed, offload=True)))
            if args.workers > 1:
                rows.append(
                    (
                        offload_workers(args.workers),
                        lambda: ConveyPath(bed, offload=True, workers=args.workers),
                    )
                )
            if args.verdict_thread:
                rows.append((OFFLOAD_THREAD, lambda: ConveyPath(bed, offload=True, verdict_thread=True)))
            if args.accounting_off:
                rows.append((OFFLOAD_NO_ACCOUNTING, lambda: ConveyPath(bed, offload=True, accounting=False)))

        def measure(row: l4.Row) -> None:
            assert isinstance(row, DataPath)
            if row.pps:
                say(f"  {row.name}: packets/s")
                results.pps.setdefault(row.name, []).append(
                    blast.measure_pps(bed, row, frames, args.pps_seconds)
                )
            if row.l4:
                say(f"  {row.name}: bulk up, bulk down, connections/s")
                per_packet = row.name == PER_PACKET or row.name.startswith("per-packet, ")
                limit = PER_PACKET_MAX_CONNECTIONS if per_packet else l4.MAX_CONNECTIONS
                l4.measure_row(tools, bed.client, row, load, results.series, limit)

        l4.run_rows(args.rounds, rows, measure, say, results.skipped)
    finally:
        bed.destroy()
    return results


def report(results: Results) -> str:
    s = results.series
    lines = [l4.l4_table(s, ROW_ORDER, results.skipped)]
    lines.append("")
    for row, base, label, targets in (
        (OFFLOAD, KERNEL_NAT, "passthrough offload / kernel NAT:", True),
        (PER_PACKET, KERNEL_NAT, "passthrough per-packet / kernel NAT:", False),
        (OFFLOAD, PER_PACKET, "passthrough offload / per-packet:", False),
        (OFFLOAD_THREAD, OFFLOAD, "offload, verdict thread / inline:", False),
        (OFFLOAD_NO_ACCOUNTING, KERNEL_NAT, "offload, accounting off / kernel NAT:", True),
        (OFFLOAD_NO_ACCOUNTING, OFFLOAD, "offload, accounting off / on:", False),
    ):
        line = l4.ratio_line(s, row, base, label, TARGETS if targets else None)
        if line:
            lines.append(line)
    for count in range(2, 9):
        for row, base, label, goals in (
            (per_packet_workers(count), PER_PACKET, f"per-packet {count} workers / 1:",
             WORKER_TARGETS if count == 2 else None),
            (per_packet_workers(count), KERNEL_NAT, f"per-packet {count} workers / kernel NAT:", None),
            (offload_workers(count), OFFLOAD, f"offload {count} workers / 1:", None),
            (offload_workers(count), KERNEL_NAT, f"offload {count} workers / kernel NAT:", TARGETS),
        ):  # fmt: skip
            line = l4.ratio_line(s, row, base, label, goals)
            if line:
                lines.append(line)
                ceiling = l4.ceiling_line(s, row, base) if base in (PER_PACKET, OFFLOAD) else None
                if ceiling:
                    lines.append(ceiling)
    per_conn = s.median(OFFLOAD, l4.PER_CONN)
    if per_conn is not None and per_conn > 3:
        lines.append(f"  note: {per_conn:.1f} packets per connection reached convey with offload on: the kernel "
                     "is not carrying the connections (is the offload plane in this tree?)")  # fmt: skip
    lines.append("")
    lines.append(blast.pps_report(results.pps, ACCEPT_ONLY, PER_PACKET))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 s measurements, one round, no kernel forwarding row (about 2 minutes with DSR)")  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, help="iperf3 -t and the connections/s window (default 5, quick 2)"
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds over every row, alternating the order (default 3, quick 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="short connections in flight (default 32)"
    )
    parser.add_argument(
        "--no-offload", action="store_true", help="skip the offload rows (a kernel without conntrack)"
    )
    parser.add_argument("--verdict-thread", action="store_true",
                        help="also an offload row with a verdict thread (CONVEY_OFFLOAD_VERDICTS=thread)")  # fmt: skip
    parser.add_argument("--accounting-off", action="store_true",
                        help="also an offload row without conntrack accounting (CONVEY_OFFLOAD_ACCOUNTING=off: "
                             "nothing counted; measures what the accounting costs)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2,
                        help="also per-packet and offload rows with this many worker processes (default 2; 1: none)")  # fmt: skip
    parser.add_argument("--keep-time-wait", action="store_true",
                        help="leave TIME_WAIT on the servers (see bench/lib/l4.py's no_time_wait)")  # fmt: skip
    parser.add_argument(
        "--no-dsr", action="store_true", help="skip the DSR part (bench/dsr.py, an L2 test bed)"
    )
    parser.add_argument(
        "--json", type=Path, help="also write every measurement (all rounds) to this JSON file"
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = 0.5 if args.quick else 1.0
    args.pps_seconds = min(args.seconds, 1.5 if args.quick else 3.0)
    if not 0.5 <= args.seconds <= 20 or not 1 <= args.rounds <= 7:
        parser.error("--seconds must be 0.5..20 and --rounds 1..7")
    if os.geteuid() != 0:
        print("bench/packet.py builds network namespaces: run it as root", file=sys.stderr)
        return 1

    procs.interrupt_on_sigterm()
    print(
        f"convey packet-path benchmark: {args.seconds:g}s per measurement, {args.rounds} round(s), "
        f"{os.cpu_count()} CPUs (load generators share them with what they measure)",
        file=sys.stderr,
    )
    started = time.monotonic()
    dsr_doc: dict[str, Any] = {}
    try:
        results = bench(args)
        print("\n".join(f"({line})" for line in results.tools))
        print(report(results), flush=True)
        if not args.no_dsr:
            from bench import dsr

            print("\nDSR (an L2 test bed; bench/dsr.py):", file=sys.stderr)
            dsr_results = dsr.run(
                rounds=args.rounds, seconds=args.seconds, warmup=args.warmup, concurrency=args.concurrency,
                offload=not args.no_offload, keep_time_wait=args.keep_time_wait,
            )  # fmt: skip
            print()
            print(dsr.report(dsr_results))
            dsr_doc = dsr_results.as_dict()
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        doc = {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "tools": results.tools,
            "series": results.series.as_dict(),
            "skipped": results.skipped,
            "pps": {k: [r.__dict__ for r in v] for k, v in results.pps.items()},
            "dsr": dsr_doc,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
