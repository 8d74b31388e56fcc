#!/usr/bin/env python3
"""DSR benchmark: convey's DSR per packet and with flow offload, both rewrites, against a kernel-only ceiling.

    sudo .venv/bin/python bench/dsr.py [--quick] [--seconds N] [--rounds N] [--no-offload] [--keep-time-wait] [--json FILE]

One L2 test bed (testbed/: client, balancer and two servers on one bridge, 198.19.0.0/24), the same servers and
load for every row, rows interleaved A/B/A/B (the order alternating every round):

* **DSR kernel ceiling**: no convey, no conntrack: every client -> VIP packet ``notrack``ed and marked in the
  balancer's namespace, and the mark policy-routed to server 0 (what ``rewrite = "mac"`` does, minus the
  decision): the most the balancer's kernel can do here.
* **DSR ip / mac per-packet**: ``convey --dsr --install-rules``, every client -> server packet through NFQUEUE.
* **DSR ip / mac offload**: ``convey --dsr --offload --install-rules`` (``[dsr] offload = true``): convey sees a
  connection's SYN, the kernel steers the rest by connmark (``mac``) or conntrack DNAT (``ip``). Skipped with
  ``--no-offload``, and skipped with convey's own message when it refuses to start.

The servers answer the client directly (prepared per row with scripts/setup-dsr-backend.sh: the VIP on lo for
``mac``, an egress NAT for ``ip``) and run without TIME_WAIT (as in bench/packet.py; ``--keep-time-wait``).
Measures, as bench/packet.py (bench/lib/l4.py): bulk Gbit/s up and down
(``iperf3 -t N`` and ``-R``, one stream, to server 0), connections/s (``bench/loadgen.c``, 32 in flight, both
servers) and the packets that reached convey per connection and per MB downloaded (its /stats verdicts). Prints a
table and the ratios per-packet / ceiling, offload / ceiling and offload / per-packet.

Everything (load generators, servers, convey) shares this machine's cores: read the ratios from one run. Every
load loop is bounded in time and count; the bed and every process are removed on exit. ``run`` and ``report`` are
imported by ``bench/packet.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib import l4, procs  # noqa: E402
from bench.lib.rounds import Series, progress  # noqa: E402
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess, ConveyProcessError  # noqa: E402
from testbed.dsr import BACKEND_STATE_DIR, IP_SERVER_PORT, VIP_PORT, backend_args, setup_script  # noqa: E402

BULK_PORT = l4.IPERF_PORT  # to server 0 only (iperf3's control and data connections together)
CEILING = "DSR kernel ceiling (mac)"
CEILING_MARK = 0x4242  # the ceiling row's fwmark and routing table
ROWS = {  # name -> (rewrite, offload)
    "DSR ip per-packet": ("ip", False),
    "DSR mac per-packet": ("mac", False),
    "DSR ip offload": ("ip", True),
    "DSR mac offload": ("mac", True),
}
ROW_ORDER = (CEILING, *ROWS)


def prepare(bed: Testbed, rewrite: str) -> list[int]:
    """Every server ready for ``rewrite`` (setup-dsr-backend.sh install); returns the VIP ports to remove."""
    ports = [VIP_PORT, BULK_PORT] if rewrite == "ip" else [VIP_PORT]  # mac: one entry puts the VIP on lo
    for server in bed.servers:
        args = backend_args(bed, server, rewrite)
        setup_script(server, "install", *args)
        if rewrite == "ip":  # the bulk port keeps its number: only the address is rewritten back
            bulk = [a for a in args if a not in ("--server-port", str(IP_SERVER_PORT))]
            bulk[bulk.index("--port") + 1] = str(BULK_PORT)
            setup_script(server, "install", *bulk)
    return ports


def unprepare(bed: Testbed, ports: list[int]) -> None:
    for server in bed.servers:
        for port in ports:
            setup_script(server, "remove", "--vip", bed.vip, "--port", str(port), check=False)
        (BACKEND_STATE_DIR / f"{server.ns}.json").unlink(missing_ok=True)


def config_text(bed: Testbed, rewrite: str, offload: bool) -> str:
    rr_port = VIP_PORT if rewrite == "mac" else IP_SERVER_PORT
    lines = [
        "[frontends.web]",
        f'listen_addr = "{bed.vip}:{VIP_PORT}"',
        'backend = "rr"',
        "[frontends.bulk]",
        f'listen_addr = "{bed.vip}:{BULK_PORT}"',
        'backend = "bulk"',
        "[backends.rr]",
        "health_check_interval = 2",
    ]
    for i, server in enumerate(bed.servers):
        lines += [f"[backends.rr.servers.s{i}]", f'addr = "{server.addr}:{rr_port}"']
    lines += [
        "[backends.bulk]",
        "health_check_interval = 2",
        "[backends.bulk.servers.s0]",
        f'addr = "{bed.servers[0].addr}:{BULK_PORT}"',
        "[dsr]",
        f'rewrite = "{rewrite}"',
    ]
    if offload:
        lines.append("offload = true  # = convey --dsr --offload")
    return "\n".join(lines) + "\n"


class DsrRow:
    """The real ``convey --dsr [--offload] --install-rules`` with the servers prepared for its rewrite."""

    def __init__(self, bed: Testbed, name: str, rewrite: str, offload: bool) -> None:
        self.bed, self.name = bed, name
        self.convey: ConveyProcess | None = None
        if offload:
            l4.flush_conntrack(bed.lb)
        self.ports = prepare(bed, rewrite)
        try:
            self.convey = ConveyProcess(
                bed, config_text(bed, rewrite, offload), mode="dsr", name=name.replace(" ", "-")
            )
            self.convey.start()
        except ConveyProcessError as exc:
            self.convey = None
            unprepare(bed, self.ports)
            if offload:
                raise l4.Skip(f"convey --dsr --offload refused to start: {l4.refusal(exc)}") from None
            raise

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_PORT if service == "rr" else BULK_PORT

    def verdicts(self) -> int:
        return l4.verdict_count(self.stats())

    def stats(self) -> dict[str, Any]:
        assert self.convey is not None
        return self.convey.stats(timeout=60)

    def cpu_pid(self) -> int | None:
        return self.convey.proc.pid if self.convey is not None and self.convey.proc is not None else None

    def close(self) -> None:
        try:
            if self.convey is not None:
                self.convey.stop()
        finally:
            unprepare(self.bed, self.ports)


class CeilingRow:
    """The kernel alone: notrack + a static mark for every client -> VIP packet, policy-routed to server 0."""

    name = CEILING

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.ports = prepare(bed, "mac")
        lb, vip, mark = bed.lb, bed.vip, f"{CEILING_MARK:#x}"
        match = f"-d {vip}/32 -p tcp -m multiport --dports {VIP_PORT},{BULK_PORT}"
        rules = ["*raw", ":CVYBENCH-RAW - [0:0]", f"-A CVYBENCH-RAW {match} -j CT --notrack",
                 "-A PREROUTING -j CVYBENCH-RAW", "COMMIT",
                 "*mangle", ":CVYBENCH-MARK - [0:0]", f"-A CVYBENCH-MARK {match} -j MARK --set-mark {mark}",
                 "-A PREROUTING -j CVYBENCH-MARK", "COMMIT", ""]  # fmt: skip
        lb.run(["iptables-restore", "--noflush"], input="\n".join(rules))
        table = str(CEILING_MARK)
        lb.run(
            ["ip", "route", "replace", "default", "via", bed.servers[0].addr, "dev", lb.iface, "table", table]
        )
        lb.run(["ip", "rule", "add", "pref", "100", "fwmark", mark, "lookup", table])
        # the VIP is local: marked packets must reach the policy rule before the local table
        lb.run(["ip", "rule", "add", "pref", "101", "lookup", "local"])
        lb.run(["ip", "rule", "del", "pref", "0", "lookup", "local"])
        for iface in ("all", lb.iface):
            lb.sysctl(f"net.ipv4.conf.{iface}.send_redirects", 0)

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_PORT if service == "rr" else BULK_PORT

    def verdicts(self) -> None:
        return None

    def cpu_pid(self) -> None:
        return None

    def stats(self) -> None:
        return None

    def close(self) -> None:
        lb = self.bed.lb
        lb.run(["ip", "rule", "add", "pref", "0", "lookup", "local"], check=False)
        lb.run(["ip", "rule", "del", "pref", "101", "lookup", "local"], check=False)
        lb.run(["ip", "rule", "del", "pref", "100", "fwmark", f"{CEILING_MARK:#x}"], check=False)
        lb.run(["ip", "route", "flush", "table", str(CEILING_MARK)], check=False)
        for table, hook, chain in (
            ("raw", "PREROUTING", "CVYBENCH-RAW"),
            ("mangle", "PREROUTING", "CVYBENCH-MARK"),
        ):
            lb.run(["iptables", "-t", table, "-D", hook, "-j", chain], check=False)
            lb.run(["iptables", "-t", table, "-F", chain], check=False)
            lb.run(["iptables", "-t", table, "-X", chain], check=False)
        unprepare(self.bed, self.ports)


@dataclass
class DsrResults:
    series: Series = field(default_factory=Series)
    skipped: dict[str, str] = field(default_factory=dict)
    tools: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"series": self.series.as_dict(), "skipped": self.skipped, "tools": self.tools}


def run(
    rounds: int = 3,
    seconds: float = 5.0,
    warmup: float = 1.0,
    concurrency: int = 32,
    offload: bool = True,
    keep_time_wait: bool = False,
) -> DsrResults:
    """Build an L2 bed, measure every row ``rounds`` times interleaved, remove the bed."""
    results = DsrResults()
    bed = Testbed.create(kind="l2", servers=2)
    try:
        tools = l4.Tools.find(bed.logdir)
        results.tools = tools.describe()
        if not keep_time_wait:
            l4.no_time_wait(bed.servers)
        for server in bed.servers:
            for port in (VIP_PORT, IP_SERVER_PORT):  # mac: the VIP's port; ip: the server port
                l4.start_rr_server(tools, server, "0.0.0.0", port)
        l4.start_bulk_server(tools, bed.servers[0], "0.0.0.0", BULK_PORT)
        load = l4.Load(seconds, warmup, concurrency)
        rows: list[tuple[str, Callable[[], l4.Row]]] = [(CEILING, lambda: CeilingRow(bed))]
        for name, (rewrite, offloaded) in ROWS.items():
            if offloaded and not offload:
                results.skipped[name] = "--no-offload"
                continue
            rows.append((name, functools.partial(DsrRow, bed, name, rewrite, offloaded)))
        say = progress()
        l4.run_rows(rounds, rows, lambda row: l4.measure_row(tools, bed.client, row, load, results.series), say,
                    results.skipped)  # fmt: skip
    finally:
        bed.destroy()
    return results


def report(results: DsrResults) -> str:
    s = results.series
    lines = [l4.l4_table(s, ROW_ORDER, results.skipped), ""]
    for rewrite in ("ip", "mac"):
        per_packet, offload = f"DSR {rewrite} per-packet", f"DSR {rewrite} offload"
        for row, base in ((per_packet, CEILING), (offload, CEILING), (offload, per_packet)):
            line = l4.ratio_line(s, row, base, f"{row} / {base.removeprefix('DSR ')}:", width=44)
            if line:
                lines.append(line)
    for rewrite in ("ip", "mac"):
        per_conn = s.median(f"DSR {rewrite} offload", l4.PER_CONN)
        if per_conn is not None and per_conn > 3:
            lines.append(f"  note: DSR {rewrite} offload: {per_conn:.1f} packets per connection reached convey "
                         "(issue 8's target: at most 3)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/dsr.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s measurements, one round")
    parser.add_argument(
        "--seconds", type=float, help="iperf3 -t and the connections/s window (default 5, quick 2)"
    )
    parser.add_argument("--rounds", type=int, help="rounds over every row (default 3, quick 1)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="short connections in flight (default 32)"
    )
    parser.add_argument(
        "--no-offload", action="store_true", help="skip the offload rows (a kernel without conntrack)"
    )
    parser.add_argument("--keep-time-wait", action="store_true",
                        help="leave TIME_WAIT on the servers (see bench/lib/l4.py's no_time_wait)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every measurement as JSON")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    rounds = args.rounds or (1 if args.quick else 3)
    if not 0.5 <= seconds <= 20 or not 1 <= rounds <= 7:
        parser.error("--seconds must be 0.5..20 and --rounds 1..7")
    if os.geteuid() != 0:
        print("bench/dsr.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    procs.interrupt_on_sigterm()
    started = time.monotonic()
    try:
        results = run(
            rounds,
            seconds,
            0.5 if args.quick else 1.0,
            args.concurrency,
            not args.no_offload,
            args.keep_time_wait,
        )
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130
    print("\n".join(f"({line})" for line in results.tools))
    print(report(results))
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(results.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
