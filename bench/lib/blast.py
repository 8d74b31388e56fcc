"""Packets/s through a userspace verdict path under a blast of prebuilt frames (bench/packet.py's accept-only and
per-packet rows).

A blaster in the client namespace (bench/lib's ``blast`` role) writes prebuilt Ethernet frames to an AF_PACKET
socket as fast as one Python loop can: TCP segments (ACK|PSH, 17 bytes of payload) of ``BLAST_FLOWS`` connections
from the client to the VIP. For convey those connections are real and established through it (the path's
``prepare_blast``), so every frame takes its hot path. A drop rule matching exactly ``BLAST_LENGTH`` (the
benchmark installs it) ends every blasted packet right after its verdict. Packets/s counts verdicts between the
start of the blast and the moment the program answers after it (once the queue has drained); the program's CPU
time gives CPU microseconds per packet; the kernel's queue drop counter tells whether the handler was saturated.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bench.lib.cpu import cpu_times, pin
from bench.lib.procs import result_of, spawn_in
from bench.lib.rounds import markdown_table
from convey.packet.checksum import internet_checksum, ip_header_checksum
from testbed.process import read_line

if TYPE_CHECKING:
    from testbed.bed import Testbed
    from testbed.host import Host

BLAST_FLOWS = 64
BLAST_SPORT = 45000
BLAST_PAYLOAD = b"convey-bench-pps!"  # 17 bytes: IP length 57, which the drop rules match
BLAST_LENGTH = 20 + 20 + len(BLAST_PAYLOAD)


class Blastable(Protocol):
    name: str

    @property
    def pid(self) -> int: ...

    def verdicts(self) -> int | None: ...

    def prepare_blast(self) -> None: ...

    def end_blast(self) -> None: ...


def queue_drops(lb: Host, queue_num: int = 0) -> int:
    """The kernel's drop counters for the queue (queue full + netlink socket full)."""
    text = lb.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0] == str(queue_num):
            return int(fields[5]) + int(fields[6])
    return 0


@dataclass
class Pps:
    pps: float
    cpu_us: float  # CPU microseconds of the verdict process per packet
    user_us: float  # of which in user space
    offered: float  # packets/s the blaster sent
    drops: int  # kernel queue drops during the blast


def blast_frames(bed: Testbed, port: int) -> list[bytes]:
    """Ethernet frames: client -> VIP:port, ACK|PSH, 17 bytes of payload, from the BLAST_FLOWS fixed ports."""

    def mac(text: str) -> bytes:
        return bytes.fromhex(text.replace(":", ""))

    frames = []
    src, dst = socket.inet_aton(bed.client.addr), socket.inet_aton(bed.vip)
    for i in range(BLAST_FLOWS):
        tcp = bytearray(struct.pack("!HHIIBBHHH", BLAST_SPORT + i, port, 1_000_000, 2_000_000, 0x50,
                                    0x18, 65535, 0, 0) + BLAST_PAYLOAD)  # fmt: skip
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i, 0x4000, 64, 6, 0, src, dst))
        struct.pack_into("!H", ip, 10, ip_header_checksum(ip))
        pseudo = src + dst + struct.pack("!HH", 6, len(tcp))
        struct.pack_into("!H", tcp, 16, internet_checksum(pseudo + tcp))
        frames.append(mac(bed.lb.mac) + mac(bed.client.mac) + b"\x08\x00" + ip + tcp)
    return frames


def measure_pps(bed: Testbed, path: Blastable, frames: list[bytes], seconds: float) -> Pps:
    """Verdicts/s at the queue while the blaster runs for ``seconds`` (see the module doc); the verdict process
    runs on the last CPU meanwhile, the blaster (and the kernel work of sending its packets) on the first."""
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
        all_cpus = set(range(os.cpu_count() or 1))
        for tid in os.listdir(f"/proc/{path.pid}/task"):  # the L4 measurements run unpinned
            os.sched_setaffinity(int(tid), all_cpus)
    assert count0 is not None and count1 is not None
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


def pps_report(pps: dict[str, list[Pps]], accept: str, convey: str) -> str:
    """The packets/s table of the accept-only loop (``accept``) and per-packet convey (``convey``)."""

    def median(name: str) -> Pps | None:
        runs = pps.get(name)
        if not runs:
            return None
        return Pps(
            statistics.median(r.pps for r in runs),
            statistics.median(r.cpu_us for r in runs),
            statistics.median(r.user_us for r in runs),
            statistics.median(r.offered for r in runs),
            sum(r.drops for r in runs),
        )

    body = []
    for name in (accept, convey):
        p = median(name)
        if p:
            body.append([name, f"{p.pps:,.0f}", f"{p.cpu_us:.2f} ({p.user_us:.2f})", f"{p.offered:,.0f}",
                         f"{p.drops:,}"])  # fmt: skip
    if not body:
        return ""
    lines = ["packets/s under a blast of established-flow packets (the per-packet verdict path):",
             markdown_table(["path", "packets/s", "CPU us/packet (user)", "offered pkt/s", "queue drops"], body)]  # fmt: skip
    a, c = median(accept), median(convey)
    if a and c:
        lines.append(f"per-packet / accept-only packets/s: {c.pps / a.pps:.2f}x   (target >= 0.8x)")
        lines.append(f"accept-only / per-packet CPU/packet: {a.cpu_us / c.cpu_us:.2f}x")
        for name in (accept, convey):
            if all(r.drops == 0 for r in pps[name]):
                lines.append(
                    f"  note: no queue drops for {name}: the blaster, not the handler, was the limit"
                )
        if len(pps[accept]) > 1:
            lines.append("  rounds, packets/s: " + "; ".join(
                f"{name} " + ", ".join(f"{r.pps:,.0f}" for r in pps[name]) for name in (accept, convey)))  # fmt: skip
    return "\n".join(lines)
