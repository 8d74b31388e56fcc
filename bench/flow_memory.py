#!/usr/bin/env python3
"""Memory per passthrough flow: N established flows built through the real per-packet core, bytes per flow.

    .venv/bin/python bench/flow_memory.py [--src DIR] [--flows N ...] [--rss] [--servers N]

No root, no queue. For each flow ``Passthrough.decide`` gets what the queue would hand it: the client's SYN, the
server's SYN-ACK, the client's ACK and one data segment each way (1000 bytes, so the flow's byte counts are real
ints, not the interpreter's cached small ones); every packet has a ``now`` of its own, as ``time.monotonic()``
gives the edge. Clients come from many addresses and ports, the chooser spreads them over ``--servers`` servers
(one port pool each; the default range 33768-61000 gives 27,233 ports per pool).

Measured: what the decision holds once the flows are built (flow table, its indexes and expiry, the port
allocator), as the ``tracemalloc`` difference between before and after building (the packets themselves are
garbage by then), divided by the number of flows; what the code makes once (at import, or at its first decision
or flow: shared tables) is made by a one-flow warm-up before. With ``--rss``, the process's resident set
difference instead (no tracemalloc: faster, and counts the allocator's rounding and free lists). The per-flow accounting of the edge
(``convey.dataplane.flow_accounting``) is not part of the core and not counted.

``--src DIR`` puts DIR first on ``sys.path`` (measure another checkout, e.g. a ``git worktree`` of the code
before a change).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path
from struct import Struct

REPO = Path(__file__).resolve().parent.parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--src", type=Path, default=REPO, help="the checkout whose convey is measured [this one]")
    p.add_argument("--flows", type=int, nargs="+", default=[100_000, 1_000_000], help="flow counts [100k 1M]")
    p.add_argument("--servers", type=int, default=64, help="servers the flows are spread over [64]")
    p.add_argument("--rss", action="store_true", help="resident set difference instead of tracemalloc")
    return p.parse_args()


ARGS = _args()
sys.path.insert(0, str(ARGS.src.resolve()))

from convey.packet.flows import FlowTable  # noqa: E402
from convey.packet.passthrough import Passthrough  # noqa: E402
from convey.packet.ports import PortAllocator  # noqa: E402

VIP, LB = bytes([198, 18, 0, 1]), bytes([198, 18, 1, 1])
_IP_TCP = Struct("!BBHHHBBH4s4sHHIIBBHHH")
SYN, ACK, SYN_ACK, PSH_ACK = 0x02, 0x10, 0x12, 0x18
DATA = b"d" * 1000


def packet(
    src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int, data: bytes
) -> bytes:
    """An IPv4 + TCP packet (checksums not filled in: the core patches them incrementally, never checks them)."""
    ip = (0x45, 0, 40 + len(data), 0, 0x4000, 64, 6, 0, src, dst)
    return _IP_TCP.pack(*ip, sport, dport, seq, ack, 0x50, flags, 65535, 0, 0) + data


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(n: int, servers: int) -> tuple[Passthrough, float]:
    """A decision holding ``n`` established flows; the seconds the building took."""
    server_addrs = [bytes([198, 18, 2 + s // 250, 1 + s % 250]) for s in range(servers)]
    choices = [(f"web/s{s}", a, 8080) for s, a in enumerate(server_addrs)]
    by_addr = dict(zip(server_addrs, choices, strict=True))
    pt = Passthrough(
        {(VIP, 80): "web"},
        [LB],
        PortAllocator(33768, 61000, (LB,), 60.0),
        FlowTable(n + 1, 10.0, 300.0, 2.0),
        lambda frontend, flow_hash: choices[flow_hash % servers],
    )
    decide, forward = pt.decide, pt.flows.forward
    now = 1000.0
    started = time.perf_counter()
    for i in range(n):
        client = bytes([100, 64 + (i >> 22) % 64, (i >> 14) & 255, 1 + (i >> 8) % 250])
        cport = 1024 + (i * 7919) % 60000
        syn = packet(client, VIP, cport, 80, SYN, 1000, 0, b"")
        now += 1e-6
        if decide(syn, now) is None:
            raise SystemExit(f"flow {i}: the SYN was dropped ({pt.counters.as_dict()})")
        flow = forward[syn[12:24]]
        _, server_addr, server_port = by_addr[flow.server_addr]
        eport = flow.eport
        for raw in (
            packet(server_addr, LB, server_port, eport, SYN_ACK, 5000, 1001, b""),
            packet(client, VIP, cport, 80, ACK, 1001, 5001, b""),
            packet(client, VIP, cport, 80, PSH_ACK, 1001, 5001, DATA),
            packet(server_addr, LB, server_port, eport, PSH_ACK, 5001, 2001, DATA),
        ):
            now += 1e-6
            if decide(raw, now) is None:
                raise SystemExit(f"flow {i}: a packet was dropped ({pt.counters.as_dict()})")
    return pt, time.perf_counter() - started


def measure(n: int) -> None:
    build(1, 1)  # warm-up: what the code makes once, at its first decision or flow (tables, caches)
    gc.collect()
    if ARGS.rss:
        before = rss()
    else:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    pt, seconds = build(n, ARGS.servers)
    gc.collect()
    after = rss() if ARGS.rss else tracemalloc.get_traced_memory()[0]
    if not ARGS.rss:
        tracemalloc.stop()
    assert len(pt.flows) == n, (len(pt.flows), n)
    held = after - before
    how = "RSS" if ARGS.rss else "tracemalloc"
    print(f"{n:>10,} flows  {held / n:>7.0f} bytes per flow  {held / 2**20:>8.1f} MB total ({how})  "
          f"built in {seconds:.1f} s")  # fmt: skip
    del pt
    gc.collect()


def main() -> None:
    import convey

    print(f"convey from {Path(convey.__file__).resolve().parent.parent}  (python {sys.version.split()[0]})")
    for n in ARGS.flows:
        measure(n)


if __name__ == "__main__":
    main()
