#!/usr/bin/env python3
"""Packet-path benchmark: convey's passthrough handler against an accept-only NFQUEUE loop and kernel forwarding.

    sudo python bench/packet.py [--quick] [--seconds N] [--rounds N] [--json FILE]

Builds a routed namespace test bed (testbed/: client -- lb -- server, all in 198.18.0.0/15; the
host's own namespace is never touched) and measures, in one run:

* packets/s through an **accept-only** NFQUEUE loop: a tiny program bound to convey's queue with convey's own
  rules and binding parameters (same queue length, copy range and socket buffer) that reads with
  ``run(block=False)``, the cheapest read loop the binding has, and whose callback only counts and accepts. That
  is the ceiling for any userspace verdict path.
* packets/s through **convey's passthrough handler**: the real ``convey --passthrough`` process, counted from its
  /stats verdict counters.

  Both get the same load: a blaster in the client namespace writes prebuilt Ethernet frames to an AF_PACKET
  socket, as fast as one Python loop can: TCP segments (ACK|PSH, 17 bytes of payload) of 64 connections from the
  client to the VIP. For convey those 64 connections are real and established through it (opened before the
  blast, from the same fixed ports), so every frame takes its hot path: lookup, rewrite, ``set_payload``,
  accept. Without convey nothing rewrites them and they go to the VIP, a local address. Either way the packets
  die right after the verdict: one iptables rule drops IP packets of exactly that length in INPUT (accept-only)
  and FORWARD (convey), so the server is not involved (the kernel still does a little more for convey's
  packets: the rewrite is copied back, and forwarding costs more than local delivery).
  The verdict process runs on the last CPU, the blaster (with the kernel's work of sending and queueing its
  packets) on the first. Packets/s counts verdicts at the queue side between the start of the blast and the
  moment the program answers after it (that is, once the queue has drained); the program's CPU time gives CPU
  microseconds per packet (user and system), which depends less on other load than packets/s does. The kernel's
  queue drop counter shows whether the handler was saturated (drops > 0: the blaster offered more than it could
  take; no drops: the blaster was the limit and the figure is a lower bound).
* TCP bulk Mbit/s (one stream, server -> client, for a fixed time) and connections/s (concurrent short
  connections: connect, 32-byte request, 32-byte reply, the server closes) **through convey** (client -> VIP)
  against **plain kernel forwarding** (client -> server directly, routed by the balancer namespace with no rule
  and no queue).

Prints a table and the ratios convey/accept-only packets/s, convey/kernel bulk and convey/kernel connections/s.
Each measurement is a function taking the bed and a data path (``KernelPath``, ``AcceptOnlyPath``,
``ConveyPath``), so DSR rows can be added as one more path. Every loop is bounded in count and time; every
process and namespace is removed on exit, on failure and on Ctrl-C. On a shared or small machine the figures are
noisy (the load generators share the CPUs with what they measure): compare ratios from one run, not absolute
numbers across runs.

The processes it starts in the namespaces are roles of bench/lib (``accept_only``, ``blast``, ``flows``,
``bulk_server``, ``rr_server``, ``bulk_client``, ``rr_client``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import statistics
import struct
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

from bench.lib.cpu import cpu_times, pin  # noqa: E402
from bench.lib.procs import ask, result_of, spawn_in, stop  # noqa: E402
from bench.lib.rounds import interleave, progress  # noqa: E402
from convey.packet.checksum import internet_checksum, ip_header_checksum  # noqa: E402
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess  # noqa: E402
from testbed.host import Host  # noqa: E402
from testbed.process import python_env, read_line  # noqa: E402

VIP_WEB_PORT = 80  # frontend for short connections -> server RR_PORT
VIP_BULK_PORT = 81  # frontend for bulk -> server SOURCE_PORT
RR_PORT = 8080
SOURCE_PORT = 9000
BLAST_FLOWS = 64
BLAST_SPORT = 45000
BLAST_PAYLOAD = b"convey-bench-pps!"  # 17 bytes: IP length 57, which the drop rules match
BLAST_LENGTH = 20 + 20 + len(BLAST_PAYLOAD)
MAX_CONNECTIONS = 20_000  # per connections/s run: within convey's fresh ephemeral ports for one server
CHUNK = 256 * 1024


# ---------------------------------------------------------------------------------------------------------------
# the bed and the data paths
# ---------------------------------------------------------------------------------------------------------------


def config_text(bed: Testbed) -> str:
    server = bed.servers[0].addr
    return f"""
[frontends.web]
listen_addr = "{bed.vip}:{VIP_WEB_PORT}"
backend = "rr"
[frontends.bulk]
listen_addr = "{bed.vip}:{VIP_BULK_PORT}"
backend = "bulk"
[backends.rr]
health_check_interval = 2
[backends.rr.servers.s0]
addr = "{server}:{RR_PORT}"
[backends.bulk]
health_check_interval = 2
[backends.bulk.servers.s0]
addr = "{server}:{SOURCE_PORT}"
[passthrough]
fin_linger = 0.5
"""


def queue_drops(lb: Host, queue_num: int = 0) -> int:
    """The kernel's drop counters for the queue (queue full + netlink socket full)."""
    text = lb.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0] == str(queue_num):
            return int(fields[5]) + int(fields[6])
    return 0


class DataPath:
    """One way through the balancer namespace. ``target(service)`` is where clients connect."""

    name = "?"

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed

    def target(self, service: str) -> tuple[str, int]:
        raise NotImplementedError

    def verdicts(self, timeout: float = 60.0) -> int:
        """Packets given a verdict so far."""
        raise NotImplementedError

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

    def __enter__(self) -> DataPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KernelPath(DataPath):
    """Plain routing through the balancer namespace: no rule, no queue."""

    name = "kernel forwarding"

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.servers[0].addr, RR_PORT if service == "rr" else SOURCE_PORT


class AcceptOnlyPath(DataPath):
    """convey's rules (installed with ``convey rules install``), with the accept-only loop bound to the queue."""

    name = "accept-only loop"

    def __init__(self, bed: Testbed, max_seconds: float) -> None:
        super().__init__(bed)
        self.config = bed.logdir / "accept-only.toml"
        self.config.write_text(config_text(bed))
        self._rules("install", "--passthrough")
        self.proc: subprocess.Popen[bytes] | None = spawn_in(
            bed.lb, "accept_only", 0, max_seconds, stdin=True
        )

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_WEB_PORT if service == "rr" else VIP_BULK_PORT

    def verdicts(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return int(ask(self.proc, "count", timeout))

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
    """The real ``convey --passthrough`` process, rules installed by it (``--install-rules``)."""

    name = "convey passthrough"

    def __init__(self, bed: Testbed) -> None:
        super().__init__(bed)
        self.convey: Any = ConveyProcess(bed, config_text(bed), name="bench-convey").start()
        self._flows: subprocess.Popen[bytes] | None = None

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_WEB_PORT if service == "rr" else VIP_BULK_PORT

    def verdicts(self, timeout: float = 60.0) -> int:
        doc = self.convey.stats(timeout=timeout)
        v = doc["packet"]["verdicts"]
        return int(v["ingress_accepted"] + v["ingress_dropped"] + v["return_accepted"] + v["return_dropped"])

    @property
    def pid(self) -> int:
        return int(self.convey.proc.pid)

    def prepare_blast(self) -> None:
        """The blasted connections, established through convey, so every frame is a packet of a known flow."""
        self._flows = spawn_in(self.bed.client, "flows", self.bed.vip, VIP_WEB_PORT, BLAST_SPORT, BLAST_FLOWS, 120,
                            stdin=True)  # fmt: skip
        flows = self.convey.stats()["packet"]["flows"]
        if flows < BLAST_FLOWS:
            raise RuntimeError(f"convey tracks {flows} flows, expected at least {BLAST_FLOWS}")

    def end_blast(self) -> None:
        if self._flows is not None:
            ask(self._flows, "stop", 20)
            self._flows.wait(10)
            self._flows = None

    def close(self) -> None:
        self.end_blast()
        self.convey.stop()


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pps:
    pps: float
    cpu_us: float  # CPU microseconds of the verdict process per packet
    user_us: float  # of which in user space
    offered: float  # packets/s the blaster sent
    drops: int  # kernel queue drops during the blast

    def show(self) -> str:
        return f"{self.pps:,.0f}"


def blast_frames(bed: Testbed) -> list[bytes]:
    """Ethernet frames: client -> VIP:80, ACK|PSH, 17 bytes of payload, from the BLAST_FLOWS fixed ports."""

    def mac(text: str) -> bytes:
        return bytes.fromhex(text.replace(":", ""))

    frames = []
    src, dst = socket.inet_aton(bed.client.addr), socket.inet_aton(bed.vip)
    for i in range(BLAST_FLOWS):
        tcp = bytearray(struct.pack("!HHIIBBHHH", BLAST_SPORT + i, VIP_WEB_PORT, 1_000_000, 2_000_000, 0x50,
                                    0x18, 65535, 0, 0) + BLAST_PAYLOAD)  # fmt: skip
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i, 0x4000, 64, 6, 0, src, dst))
        struct.pack_into("!H", ip, 10, ip_header_checksum(ip))
        pseudo = src + dst + struct.pack("!HH", 6, len(tcp))
        struct.pack_into("!H", tcp, 16, internet_checksum(pseudo + tcp))
        frames.append(mac(bed.lb.mac) + mac(bed.client.mac) + b"\x08\x00" + ip + tcp)
    return frames


def measure_pps(bed: Testbed, path: DataPath, frames: list[bytes], seconds: float) -> Pps:
    """Verdicts/s at the queue while the blaster runs for ``seconds`` (see the module doc). The verdict process
    runs on the last CPU, the blaster (and the kernel work of sending and queueing its packets) on the first."""
    path.prepare_blast()
    last_cpu = (os.cpu_count() or 1) - 1
    pin(path.pid, last_cpu)
    try:
        count0, cpu0 = path.verdicts(), cpu_times(path.pid)
        drops0 = queue_drops(bed.lb)
        blaster = spawn_in(bed.client, "blast", "eth0", seconds, ready=False, stdin=True)
        assert blaster.stdin is not None
        pin(blaster.pid, 0)
        blaster.stdin.write(json.dumps([f.hex() for f in frames]).encode() + b"\n")
        blaster.stdin.flush()
        if read_line(blaster, 20) != "ready":
            raise RuntimeError("the blaster did not start")
        started = time.monotonic()
        sent = result_of(blaster, seconds + 30)
        count1 = path.verdicts()  # answered once the queue has drained
        cpu = cpu_times(path.pid) - cpu0
        elapsed = time.monotonic() - started
        drops = queue_drops(bed.lb) - drops0
    finally:
        path.end_blast()
    packets = count1 - count0
    if packets <= 0:
        raise RuntimeError(f"{path.name}: no packet got a verdict")
    user, system = cpu
    return Pps(
        packets / elapsed,
        (user + system) * 1e6 / packets,
        user * 1e6 / packets,
        sent["sent"] / sent["seconds"],
        drops,
    )


def measure_bulk(bed: Testbed, path: DataPath, seconds: float) -> float:
    """Mbit/s of one TCP stream server -> client through ``path``."""
    addr, port = path.target("bulk")
    warmup = min(0.3, seconds / 4)
    proc = spawn_in(bed.client, "bulk_client", addr, port, seconds, 1, "D", warmup, CHUNK, ready=False)
    result = result_of(proc, warmup + seconds + 30)
    if result["errors"]:
        raise RuntimeError(f"bulk client errors: {result['errors']}")
    return float(result["bytes_per_second"]) * 8 / 1e6


def measure_conns(bed: Testbed, path: DataPath, seconds: float, concurrency: int) -> tuple[float, int]:
    """(connections/s, failed connections) for short connections through ``path``."""
    addr, port = path.target("rr")
    proc = spawn_in(
        bed.client, "rr_client", addr, port, seconds, concurrency, MAX_CONNECTIONS, 0, "rr", ready=False
    )
    result = result_of(proc, seconds + 60)
    return float(result["per_second"]), int(result["errors"])


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    pps: dict[str, list[Pps]] = field(default_factory=dict)
    bulk: dict[str, float] = field(default_factory=dict)
    conns: dict[str, tuple[float, int]] = field(default_factory=dict)


def bench(args: argparse.Namespace) -> Results:
    results = Results()
    bed = Testbed.create(kind="routed", servers=1)
    try:
        spawn_in(bed.servers[0], "rr_server", bed.servers[0].addr, RR_PORT)
        spawn_in(bed.servers[0], "bulk_server", bed.servers[0].addr, SOURCE_PORT, CHUNK)
        # blasted packets die right after the verdict, the same way on both paths
        for chain in ("INPUT", "FORWARD"):
            bed.lb.run(["iptables", "-A", chain, "-p", "tcp", "-m", "length", "--length", str(BLAST_LENGTH),
                        "-j", "DROP"])  # fmt: skip
        frames = blast_frames(bed)
        say = progress()

        with KernelPath(bed) as kernel:
            say("kernel forwarding: bulk")
            results.bulk[kernel.name] = measure_bulk(bed, kernel, args.seconds)
            say("kernel forwarding: connections")
            results.conns[kernel.name] = measure_conns(bed, kernel, args.seconds, args.concurrency)
        paths: list[Callable[[], DataPath]] = [
            functools.partial(AcceptOnlyPath, bed, 600),
            functools.partial(ConveyPath, bed),
        ]
        for round_no, make in interleave(args.rounds, paths, alternate=True):
            with make() as path:
                say(f"round {round_no + 1}: {path.name}: packets/s")
                results.pps.setdefault(path.name, []).append(measure_pps(bed, path, frames, args.seconds))
                if isinstance(path, ConveyPath) and path.name not in results.bulk:
                    say("convey passthrough: bulk")
                    results.bulk[path.name] = measure_bulk(bed, path, args.seconds)
                    say("convey passthrough: connections")
                    results.conns[path.name] = measure_conns(bed, path, args.seconds, args.concurrency)
    finally:
        bed.destroy()
    return results


def report(results: Results) -> str:
    accept, convey = "accept-only loop", "convey passthrough"
    kernel = "kernel forwarding"
    lines = ["| path | packets/s | CPU us/packet (user) | offered pkt/s | queue drops | bulk Mbit/s | conn/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def median(name: str) -> Pps | None:
        runs = results.pps.get(name)
        if not runs:
            return None
        return Pps(
            statistics.median(r.pps for r in runs),
            statistics.median(r.cpu_us for r in runs),
            statistics.median(r.user_us for r in runs),
            statistics.median(r.offered for r in runs),
            sum(r.drops for r in runs),
        )

    for name in (kernel, accept, convey):
        p = median(name)
        cells = (
            [f"{p.pps:,.0f}", f"{p.cpu_us:.2f} ({p.user_us:.2f})", f"{p.offered:,.0f}", f"{p.drops:,}"]
            if p
            else ["-"] * 4
        )
        bulk = results.bulk.get(name)
        conns = results.conns.get(name)
        cells.append(f"{bulk:,.0f}" if bulk is not None else "-")
        cells.append(f"{conns[0]:,.0f}" + (f" ({conns[1]} failed)" if conns[1] else "") if conns else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    a, c = median(accept), median(convey)
    if a and c:
        lines.append(f"convey / accept-only packets/s:   {c.pps / a.pps:.2f}x   (target >= 0.8x)")
        lines.append(f"accept-only / convey CPU/packet:  {a.cpu_us / c.cpu_us:.2f}x")
        for name in (accept, convey):
            if not results.pps[name] or all(r.drops == 0 for r in results.pps[name]):
                lines.append(
                    f"  note: no queue drops for {name}: the blaster, not the handler, was the limit"
                )
        if len(results.pps[accept]) > 1:
            lines.append(
                "  rounds, packets/s: "
                + "; ".join(
                    f"{name} " + ", ".join(f"{r.pps:,.0f}" for r in results.pps[name])
                    for name in (accept, convey)
                )
            )
    if convey in results.bulk and kernel in results.bulk:
        lines.append(f"convey / kernel bulk Mbit/s:      {results.bulk[convey] / results.bulk[kernel]:.2f}x")
    if convey in results.conns and kernel in results.conns:
        lines.append(
            f"convey / kernel connections/s:    {results.conns[convey][0] / results.conns[kernel][0]:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements, one packets/s round")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 3, quick 1.5)")
    parser.add_argument(
        "--rounds", type=int, help="packets/s rounds per path, alternating (default 3, quick 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent short connections (default 32)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--no-dsr",
        action="store_true",
        help="skip the DSR vs passthrough part (bench/dsr.py, an L2 test bed)",
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.5 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if not 0.5 <= args.seconds <= 20 or not 1 <= args.rounds <= 5:
        parser.error("--seconds must be 0.5..20 and --rounds 1..5")
    if os.geteuid() != 0:
        print("bench/packet.py builds network namespaces: run it as root", file=sys.stderr)
        return 1

    main_pid = os.getpid()

    def on_term(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked helper (pyroute2 forks for namespace work): just go
            os._exit(128 + signum)
        raise KeyboardInterrupt  # clean up as on Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    print(
        f"convey packet-path benchmark: {args.seconds:g}s per measurement, {args.rounds} packets/s round(s), "
        f"{os.cpu_count()} CPUs (load generators share them with what they measure)",
        file=sys.stderr,
    )
    started = time.monotonic()
    dsr_rows: list[dict[str, Any]] = []
    try:
        results = bench(args)
        print(report(results), flush=True)
        if not args.no_dsr:
            from bench import (
                dsr,
            )  # DSR vs passthrough on one L2 test bed: balancer packets/s and download Mbit/s

            print("\nDSR vs passthrough (same L2 test bed; bench/dsr.py):", file=sys.stderr)
            dsr_rows = dsr.run(quick=args.quick)
            print()
            print(dsr.report(dsr_rows))
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        doc = {
            "seconds": args.seconds,
            "pps": {k: [r.__dict__ for r in v] for k, v in results.pps.items()},
            "bulk_mbit_s": results.bulk,
            "conn_s": {k: {"per_second": v[0], "failed": v[1]} for k, v in results.conns.items()},
            "dsr": dsr_rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
