#!/usr/bin/env python3
"""Queue bindings side by side: netfilterqueue vs convey's own netlink binding with and without GSO (root only).

    sudo .venv/bin/python bench/queue_binding.py [--quick] [--seconds N] [--rounds N] [--no-pps] [--json FILE]

Builds a routed namespace test bed (testbed/: client -- lb -- two servers, 198.18.0.0/15; the host's namespace is
never touched) and measures, rows interleaved A/B/A/B (the order alternating every round):

* **bulk** (iperf3 up and down, one stream, bench/lib/l4.py) through ``convey --passthrough`` per packet with
  ``[passthrough] queue_binding = "netfilterqueue"``, ``"netlink"`` (GSO on: one verdict per super-packet) and
  ``"netlink"`` with ``CONVEY_QUEUE_GSO=0`` (the kernel segments before queueing), against **kernel NAT**
  (iptables DNAT + SNAT, no convey): the baseline of issue 9's target, per-packet bulk >= 0.25x kernel NAT with
  GSO. Also the verdicts per MB downloaded (convey's /stats).
* **packets/s** under bench/lib/blast.py's frame blast (small established-flow segments, so GSO plays no part):
  accept-only loops (netfilterqueue's, the netlink binding's ``NetlinkQueue`` with a callback that accepts, and
  fnfqueue's when the package is installed) and per-packet convey with either binding.

Prints medians with ``±`` half the spread and the ratios. The load generators share the 2 CPUs with what they
measure, and other work on the machine shows up as spread: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib import blast, l4, procs  # noqa: E402
from bench.lib.rounds import Series, markdown_table, progress  # noqa: E402
from bench.packet import (  # noqa: E402
    BULK_PORT,
    RR_PORT,
    VIP_WEB_PORT,
    AcceptOnlyPath,
    ConveyPath,
    KernelNatPath,
    config_text,
)
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess  # noqa: E402
from testbed.process import python_env, read_line  # noqa: E402

KERNEL_NAT = "kernel NAT"
NFQ = "per-packet netfilterqueue"
NL_GSO = "per-packet netlink GSO"
NL_NOGSO = "per-packet netlink no GSO"
NL_FULL = "per-packet netlink GSO, full checksums"  # --variants: the checksum of every GSO packet in Python
NL_JOINED = "per-packet netlink GSO, one buffer"  # --variants: payloads copied into the batch's buffer
ACC_NFQ = "accept-only netfilterqueue"
ACC_NL = "accept-only netlink"
ACC_FNFQ = "accept-only fnfqueue"
BULK_ROWS = (KERNEL_NAT, NFQ, NL_GSO, NL_NOGSO, NL_FULL, NL_JOINED)
PPS_ROWS = (ACC_NFQ, ACC_NL, ACC_FNFQ, NFQ, NL_GSO)
TARGET = 0.25  # per-packet bulk with GSO / kernel NAT, issue 9


class BindingPath(ConveyPath):
    """``convey --passthrough`` per packet with the given queue binding and environment (the netlink binding's
    debug switches: ``CONVEY_QUEUE_GSO``, ``CONVEY_QUEUE_GSO_CSUM``, ``CONVEY_QUEUE_PIECE_MIN``)."""

    def __init__(self, bed: Testbed, name: str, binding: str, env: dict[str, str] | None = None) -> None:
        self.bed = bed
        self.offload = False
        self.name = name
        self.pps = True
        text = config_text(bed) + f'queue_binding = "{binding}"\n'
        self.convey: Any = ConveyProcess(bed, text, name=name.replace(" ", "-"), extra_env=env).start()
        self._flows: subprocess.Popen[bytes] | None = None


class ScriptAcceptOnly(AcceptOnlyPath):
    """convey's rules with one of this script's accept-only roles (``--role``) bound to the queue."""

    def __init__(self, bed: Testbed, name: str, role: str, max_seconds: float) -> None:
        self.bed = bed
        self.name = name
        self.config = bed.logdir / f"{role}.toml"
        self.config.write_text(config_text(bed))
        self._rules("install", "--passthrough")
        self.proc = bed.lb.popen([sys.executable, str(Path(__file__).resolve()), "--role", role, str(max_seconds)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=python_env())  # fmt: skip
        line = read_line(self.proc, 20)
        if line != "ready":
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-1500:]
            self.close()
            raise l4.Skip(f"{role} did not start: {line!r} {err.decode(errors='replace')}")


# -- the accept-only roles (run in the balancer's namespace) ----------------------------------------------------


def role_netlink(max_seconds: float) -> None:
    from convey.dataplane.nfq_socket import NetlinkQueue
    from convey.dataplane.nfqueue import Batch

    count = 0
    batch = Batch()

    def callback(pkt: Any) -> None:
        nonlocal count
        count += 1
        batch.left -= 1
        pkt.accept()

    async def main() -> None:
        queue = NetlinkQueue(0, callback, batch)
        queue.start()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stdin() -> None:
            line = sys.stdin.readline()
            if line.strip() in ("", "stop"):
                done.set()
            else:
                print(count, flush=True)

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        print("ready", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), max_seconds)
        queue.stop()

    asyncio.run(main())


def role_fnfqueue(max_seconds: float) -> None:
    import threading

    import fnfqueue

    count = 0
    conn = fnfqueue.Connection()
    queue = conn.bind(0)
    queue.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
    queue.set_maxlen(8192)

    def control() -> None:
        end = time.monotonic() + max_seconds
        while time.monotonic() < end:
            line = sys.stdin.readline()
            if line.strip() in ("", "stop"):
                break
            print(count, flush=True)
        conn.close()

    threading.Thread(target=control, daemon=True).start()
    print("ready", flush=True)
    while True:
        try:
            for packet in conn:
                count += 1
                packet.accept()
            return
        except fnfqueue.BufferOverflowException:  # ENOBUFS: packets were lost (the kernel counts them); go on
            conn.reset()


def server_connections(bed: Testbed) -> list[str]:
    """The bulk server's TCP connections on BULK_PORT that are not closed yet (``ss`` in its namespace)."""
    out = bed.servers[0].run(["ss", "-Htn", "state", "connected", f"sport = :{BULK_PORT}"], check=False,
                             timeout=10).stdout  # fmt: skip
    return [line for line in out.splitlines() if line.strip() and not line.startswith("TIME-WAIT")]


def settle(bed: Testbed, say: Callable[[str], None], seconds: float = 3.0) -> None:
    """Wait until the iperf3 server holds no connection of an earlier test; kill what is left after ``seconds``.

    The crash this prevents (a 3-round run, round 2): iperf3 -s serves one test at a time and reads its control
    connection with blocking reads. When a row's convey stopped before the last packets of a test's connections
    went through (the client's FIN, or the end of a -R test), the server kept the dead connection and never
    accepted the next test, whose client then waited until its timeout (34 s). So a row waits for the test's
    connections to close while its convey still forwards, and leftovers are destroyed (``ss -K``)."""
    deadline = time.monotonic() + seconds
    while (left := server_connections(bed)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the server's sockets
    if left:
        bed.servers[0].run(
            ["ss", "-Ktn", "state", "connected", f"sport = :{BULK_PORT}"], check=False, timeout=10
        )
        say(
            f"  killed {len(left)} connection(s) left at the bulk server: {' | '.join(' '.join(x.split()) for x in left)}"
        )


def settled_bulk(tools: l4.Tools, bed: Testbed, addr: str, port: int, seconds: float, down: bool,
                 say: Callable[[str], None]) -> tuple[float, int]:  # fmt: skip
    """``l4.bulk`` between two ``settle``s; one retry, with the sockets of both ends logged, if iperf3 hangs."""
    settle(bed, say, 0.5)
    try:
        result = l4.bulk(tools, bed.client, addr, port, seconds, down)
    except subprocess.TimeoutExpired:
        ends = {
            host.role: host.run(["ss", "-tnoi"], check=False, timeout=10).stdout
            for host in (bed.client, bed.servers[0])
        }
        (bed.logdir / "bulk-timeout.txt").write_text(json.dumps(ends, indent=1))
        say(
            f"  iperf3 hung ({'down' if down else 'up'}); sockets in {bed.logdir / 'bulk-timeout.txt'}; once more"
        )
        settle(bed, say, 0.0)
        result = l4.bulk(tools, bed.client, addr, port, seconds, down)
    settle(bed, say)
    return result


def named(path: AcceptOnlyPath, name: str) -> AcceptOnlyPath:
    path.name = name
    return path


# -- the run ----------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> tuple[Series, dict[str, list[blast.Pps]], dict[str, str]]:
    series, pps, skipped = Series(), {}, {}  # type: ignore[var-annotated]
    bed = Testbed.create(kind="routed", servers=2)
    try:
        tools = l4.Tools.find(bed.logdir)
        if not tools.iperf3:
            raise SystemExit("bench/queue_binding.py needs iperf3 (scripts/install-system-deps.sh)")
        l4.no_time_wait(bed.servers)
        l4.start_rr_server(tools, bed.servers[0], bed.servers[0].addr, RR_PORT)
        l4.start_rr_server(tools, bed.servers[1], bed.servers[1].addr, RR_PORT)
        l4.start_bulk_server(tools, bed.servers[0], bed.servers[0].addr, BULK_PORT)
        for chain in ("INPUT", "FORWARD"):
            bed.lb.run(["iptables", "-A", chain, "-p", "tcp", "-m", "length", "--length", str(blast.BLAST_LENGTH),
                        "-j", "DROP"])  # fmt: skip
        frames = blast.blast_frames(bed, VIP_WEB_PORT)
        say = progress()
        rows: list[tuple[str, Callable[[], l4.Row]]] = [
            (KERNEL_NAT, lambda: KernelNatPath(bed)),
            (NFQ, lambda: BindingPath(bed, NFQ, "netfilterqueue")),
            (NL_GSO, lambda: BindingPath(bed, NL_GSO, "netlink")),
            (NL_NOGSO, lambda: BindingPath(bed, NL_NOGSO, "netlink", {"CONVEY_QUEUE_GSO": "0"})),
        ]
        if args.variants:
            rows += [
                (NL_FULL, lambda: BindingPath(bed, NL_FULL, "netlink", {"CONVEY_QUEUE_GSO_CSUM": "full"})),
                (NL_JOINED, lambda: BindingPath(bed, NL_JOINED, "netlink", {"CONVEY_QUEUE_PIECE_MIN": "0"})),
            ]
        if args.pps:
            rows += [
                (ACC_NFQ, lambda: named(AcceptOnlyPath(bed, 600), ACC_NFQ)),
                (ACC_NL, lambda: ScriptAcceptOnly(bed, ACC_NL, "netlink", 600)),
                (ACC_FNFQ, lambda: ScriptAcceptOnly(bed, ACC_FNFQ, "fnfqueue", 600)),
            ]

        def measure(row: Any) -> None:
            if row.l4 and args.bulk:
                say(f"  {row.name}: bulk up, bulk down")
                addr, port = row.target("bulk")
                for metric, down in ((l4.UP, False), (l4.DOWN, True)):
                    before = row.verdicts()
                    gbit, received = settled_bulk(tools, bed, addr, port, args.seconds, down, say)
                    series.add(row.name, metric, gbit)
                    after = row.verdicts()
                    if down and before is not None and after is not None and received:
                        series.add(row.name, l4.PER_MB, (after - before) / (received / 1e6))
            if args.pps and row.pps and row.name in PPS_ROWS:
                say(f"  {row.name}: packets/s")
                pps.setdefault(row.name, []).append(blast.measure_pps(bed, row, frames, args.pps_seconds))

        if args.rows:
            wanted = [w.strip() for w in args.rows.split(",")]
            rows = [row for row in rows if any(w in row[0] for w in wanted)]
        l4.run_rows(args.rounds, rows, measure, say, skipped)
    finally:
        bed.destroy()
    return series, pps, skipped


def report(series: Series, pps: dict[str, list[blast.Pps]], skipped: dict[str, str]) -> str:
    body = [[name, series.cell(name, l4.UP, ".2f"), series.cell(name, l4.DOWN, ".2f"), series.cell(name, l4.PER_MB, ",.0f")]
            for name in BULK_ROWS if name in series.values]  # fmt: skip
    lines = [markdown_table(["path", "bulk up Gbit/s", "bulk down Gbit/s", "verdicts per MB down"], body)]
    lines += [f"{name}: SKIPPED: {reason}" for name, reason in skipped.items()]
    lines.append("")
    for row, base in (
        (NL_GSO, KERNEL_NAT),
        (NL_NOGSO, KERNEL_NAT),
        (NFQ, KERNEL_NAT),
        (NL_GSO, NFQ),
        (NL_NOGSO, NFQ),
        (NL_GSO, NL_FULL),
        (NL_GSO, NL_JOINED),
    ):
        line = l4.ratio_line(series, row, base, f"{row} / {base}:", width=58)
        if line:
            if base == KERNEL_NAT and row == NL_GSO:
                worst = min(
                    v for v in (series.ratio(row, base, m) for m in (l4.UP, l4.DOWN)) if v is not None
                )
                line += f"   (target >= {TARGET}x: {'met' if worst >= TARGET else 'NOT met'})"
            lines.append(line)
    if pps:
        import statistics

        lines += ["", "packets/s under a blast of small established-flow segments (GSO plays no part):"]
        rows = []
        for name in PPS_ROWS:
            runs = pps.get(name)
            if runs:
                values = [r.pps for r in runs]
                spread = (
                    (max(values) - min(values)) / statistics.median(values) * 50 if len(values) > 1 else 0
                )
                rows.append([name, f"{statistics.median(values):,.0f} ±{spread:.0f}%",
                             f"{statistics.median(r.cpu_us for r in runs):.2f}", f"{sum(r.drops for r in runs):,}"])  # fmt: skip
        lines.append(markdown_table(["path", "packets/s", "CPU us/packet", "queue drops"], rows))
        med = {n: statistics.median(r.pps for r in pps[n]) for n in pps}
        for a, b in ((ACC_NL, ACC_NFQ), (ACC_FNFQ, ACC_NFQ), (NL_GSO, NFQ)):
            if a in med and b in med:
                lines.append(f"{a} / {b}: {med[a] / med[b]:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--role"]:
        {"netlink": role_netlink, "fnfqueue": role_fnfqueue}[argv[1]](float(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s measurements, one round")
    parser.add_argument("--seconds", type=float, help="iperf3 -t (default 4, quick 2)")
    parser.add_argument("--rounds", type=int, help="rounds over every row, alternating the order (default 3)")
    parser.add_argument("--no-pps", dest="pps", action="store_false", help="bulk only")
    parser.add_argument("--no-bulk", dest="bulk", action="store_false", help="packets/s only")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also the netlink binding with full checksums for GSO packets, and without sendmsg pieces",
    )
    parser.add_argument("--rows", help="only the rows whose names contain one of these comma-separated words")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 4.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.pps_seconds = 1.5 if args.quick else 2.5
    if not 0.5 <= args.seconds <= 20 or not 1 <= args.rounds <= 7:
        parser.error("--seconds must be 0.5..20 and --rounds 1..7")
    if os.geteuid() != 0:
        print("bench/queue_binding.py builds network namespaces: run it as root", file=sys.stderr)
        return 1
    procs.interrupt_on_sigterm()
    print(f"queue bindings: {args.seconds:g}s per bulk measurement, {args.rounds} round(s), {os.cpu_count()} CPUs "
          "(load generators share them with what they measure)", file=sys.stderr)  # fmt: skip
    started = time.monotonic()
    try:
        series, pps, skipped = bench(args)
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130
    print(report(series, pps, skipped))
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        doc = {"series": series.as_dict(), "pps": {k: [r.__dict__ for r in v] for k, v in pps.items()},
               "skipped": skipped}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
