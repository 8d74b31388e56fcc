#!/usr/bin/env python3
"""Micro-benchmark of the per-packet hot path: Python ns per packet over real packet bytes, no queue, no root.

    .venv/bin/python bench/hotpath.py [--src DIR] [--repeat N] [--number N] [--payload BYTES] [--json FILE]

A packet of an established flow (no SYN, FIN or RST, no IP options), fed again and again to:

* ``decide``: ``Passthrough.decide`` / ``Dsr.decide`` alone, what the queue edge calls per packet;
* ``edge model``: a queue callback on a fake packet doing what the edge does around ``decide`` (count the
  batch down, ``get_payload``, ``decide(payload, monotonic())``, ``set_payload``/``set_mark`` and ``accept``,
  look at ``rst_out``): comparable with the rows below, which are callbacks on the same fake packet;
* ``plane callback``: the real queue callback of the tree measured (``PassthroughPlane._callback``,
  ``DsrPlane._callback``), when it exists there;
* ``old fused callback``, ``old full-path callback``, ``old dsr callback``: ``PacketPlane._passthrough_handler``
  (the hot path inlined in the edge), ``PacketPlane._on_packet_passthrough`` (the callback it fell back to,
  through the decision's ``ingress``/``egress``) and ``PacketPlane._on_packet_dsr``, when the tree measured
  still has them (commit 8af15a9 does);
  (a copy of that fused callback used to be kept here too; it needed the flow layout before issue 10's
  smaller flows, so compare with the old tree through ``--src`` instead);

for four scenarios: passthrough ingress (client -> VIP) and return (server -> balancer), DSR ``ip`` and
``mac``. Two more rows measure the flow key alone (``flows.py`` quotes them): one ``struct`` unpack of the hot
header plus a dict lookup by its 12-byte ``bytes`` key, against an unpack into (src, dst, sport, dport) plus a
lookup by that tuple.

``--src DIR`` puts DIR first on ``sys.path``, so another checkout's ``convey`` is measured (for example the
code before a change: ``git worktree add /tmp/convey-before COMMIT``, then ``--src /tmp/convey-before``). Each
row is timed ``--number`` packets at a time (``timeit``, garbage collection off), ``--repeat`` times, the rows
interleaved (``bench.lib.rounds``) so a busy moment of the machine hits all of them; the table shows, in ns per
packet, the median, the spread ((slowest - fastest) / median) and the fastest timing. On a shared VM the
fastest timing is the steadiest figure (other jobs only ever add time); compare rows within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from struct import Struct
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--src", type=Path, default=REPO, help="the checkout whose convey is measured [this one]")
    p.add_argument("--repeat", type=int, default=9, help="timings per row [9]")
    p.add_argument("--number", type=int, default=100_000, help="packets per timing [100000]")
    p.add_argument("--payload", type=int, default=100, help="TCP payload bytes of the packets [100]")
    p.add_argument("--json", type=Path, help="also write every timing to this file")
    return p.parse_args()


if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.lib.rounds import interleave, median, spread  # noqa: E402  (before --src comes first on the path)

ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    sys.path.insert(0, str(ARGS.src.resolve()))

from convey import stats as st  # noqa: E402
from convey.packet.checksum import internet_checksum  # noqa: E402
from convey.packet.dsr import Dsr  # noqa: E402
from convey.packet.flows import FlowTable  # noqa: E402
from convey.packet.passthrough import Passthrough  # noqa: E402
from convey.packet.ports import PortAllocator  # noqa: E402

CLIENT, VIP, LB = bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1]), bytes([198, 18, 1, 1])
SERVER, SERVER_PORT = bytes([198, 18, 1, 2]), 8080
VIPS = {(VIP, 80): "web"}
SERVER_ID = "web/s0"
MARK = 0x101
BATCH_FOREVER = 1 << 62  # the callbacks count a batch down; this one never ends during a run
ARGS_PAYLOAD = ARGS.payload if ARGS is not None else 100

_IP = Struct("!BBHHHBBH4s4s")
_TCP = Struct("!HHIIBBHHH")


def tcp(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    """An IPv4 + TCP packet with both checksums right, as the kernel queues it (flags: the TCP flag bits)."""
    total = 40 + len(payload)
    ip = bytearray(_IP.pack(0x45, 0, total, 1, 0x4000, 64, 6, 0, src, dst))
    ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
    seg = bytearray(_TCP.pack(sport, dport, 1000, 2000, 0x50, flags, 65535, 0, 0) + payload)
    pseudo = src + dst + bytes([0, 6]) + len(seg).to_bytes(2, "big")
    seg[16:18] = internet_checksum(pseudo + seg).to_bytes(2, "big")
    return bytes(ip + seg)


SYN, ACK, PSH = 0x02, 0x10, 0x08


class FakePacket:
    """The netfilterqueue packet as a callback sees it: a payload in, a verdict out."""

    __slots__ = ("mark", "out", "payload", "verdict")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.out: bytes | None = None
        self.mark = 0
        self.verdict = 0

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.out = payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = 1

    def drop(self) -> None:
        self.verdict = 0


class _Batch:
    """Stands in for ``nfqueue.Batch`` in the edge model (same two attributes, never ends)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = BATCH_FOREVER

    def end(self) -> None:
        self.left = BATCH_FOREVER


def edge_model(decide: Callable[[bytes, float], Any], rst_out: list[bytes]) -> Callable[[Any], None]:
    """What a queue edge does around ``decide`` (as ``convey/dataplane``'s callbacks do)."""
    batch, monotonic = _Batch(), time.monotonic

    def on_packet(pkt: Any) -> None:
        left = batch.left - 1
        batch.left = left
        if left <= 0:
            batch.end()
        try:
            out = decide(pkt.get_payload(), monotonic())
            if out is None:
                pkt.drop()
            elif out.__class__ is int:
                if out:
                    pkt.set_mark(out)
                pkt.accept()
            else:
                pkt.set_payload(out)
                pkt.accept()
        except Exception:
            pkt.drop()
        if rst_out:
            rst_out.clear()

    return on_packet


def passthrough() -> tuple[Passthrough, bytes, bytes]:
    """A decision with one established flow, and a client data packet and a server data packet of it."""
    pt = Passthrough(
        VIPS,
        [LB],
        PortAllocator(40000, 40999, (LB,), 60),
        FlowTable(1000),
        lambda f, h: (SERVER_ID, SERVER, 8080),
    )
    assert pt.decide(tcp(CLIENT, VIP, 50000, 80, SYN), 0.0) is not None
    (flow,) = list(pt.flows)
    assert pt.decide(tcp(SERVER, LB, SERVER_PORT, flow.eport, SYN | ACK), 0.0) is not None
    payload = b"x" * ARGS_PAYLOAD
    ingress = tcp(CLIENT, VIP, 50000, 80, ACK | PSH, payload)
    ret = tcp(SERVER, LB, SERVER_PORT, flow.eport, ACK | PSH, payload)
    assert pt.decide(ingress, 0.0) is not None and pt.decide(ret, 0.0) is not None
    return pt, ingress, ret


def dsr(rewrite: str) -> tuple[Dsr, bytes]:
    d = Dsr(VIPS, FlowTable(1000), lambda f, h: (SERVER_ID, SERVER, 8080), rewrite, {SERVER_ID: MARK})
    d.decide(tcp(CLIENT, VIP, 50000, 80, SYN), 0.0)
    d.decide(tcp(CLIENT, VIP, 50000, 80, ACK), 0.0)  # the client's second packet establishes the flow
    data = tcp(CLIENT, VIP, 50000, 80, ACK | PSH, b"x" * ARGS_PAYLOAD)
    assert d.decide(data, 0.0) is not None
    return d, data


Row = tuple[str, str, Callable[[], None] | str, dict[str, Any]]  # scenario, way, stmt, globals


def _old_plane(decider: Any) -> Any:
    """Commit 8af15a9's ``PacketPlane`` around ``decider``, or None when the tree measured has none."""
    try:
        from convey.dataplane.packet_plane import PacketPlane  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    mode = "passthrough" if isinstance(decider, Passthrough) else "dsr"
    plane = PacketPlane(mode, {}, st.Stats(mode, 0.0))
    plane.vips = dict(VIPS)
    plane._vip_addrs = frozenset({VIP})
    plane.decider = decider
    return plane


def _plane_callback(decider: Any) -> Callable[[Any], None] | None:
    """The edge's own queue callback (``PassthroughPlane``/``DsrPlane._callback``) when the tree has them."""
    try:
        from convey.dataplane.nfqueue import Batch

        if isinstance(decider, Passthrough):
            from convey.dataplane.passthrough_plane import PassthroughPlane as Plane  # type: ignore[import-not-found,unused-ignore]
        else:
            from convey.dataplane.dsr_plane import DsrPlane as Plane  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    plane: Any = Plane({}, st.Stats("bench", 0.0))
    batch = Batch(size=BATCH_FOREVER)
    batch.begin()
    callback: Callable[[Any], None] = plane._callback(decider, batch)
    return callback


def rows() -> list[Row]:
    out: list[Row] = []
    for scenario in ("passthrough ingress", "passthrough return", "dsr ip", "dsr mac"):
        if scenario.startswith("passthrough"):
            decider, ingress, ret = passthrough()
            payload = ingress if scenario.endswith("ingress") else ret
        else:
            decider, payload = dsr(scenario.split()[1])
        pkt = FakePacket(payload)
        out.append((scenario, "decide", "f(p, 1.0)", {"f": decider.decide, "p": payload}))
        out.append(
            (scenario, "edge model", "f(k)", {"f": edge_model(decider.decide, decider.rst_out), "k": pkt})
        )
        callback = _plane_callback(decider)
        if callback is not None:
            out.append((scenario, "plane callback", "f(k)", {"f": callback, "k": pkt}))
        old = _old_plane(decider)
        if old is not None and isinstance(decider, Passthrough):
            from convey.dataplane.nfqueue import Batch

            batch = Batch(size=BATCH_FOREVER)
            batch.begin()
            fused = old._passthrough_handler(decider, batch)
            out.append((scenario, "old fused callback", "f(k)", {"f": fused, "k": pkt}))
            full = old._on_packet_passthrough
            out.append((scenario, "old full-path callback", "f(k)", {"f": full, "k": pkt}))
        elif old is not None:
            out.append((scenario, "old dsr callback", "f(k)", {"f": old._on_packet_dsr, "k": pkt}))
    # The flow key alone: bytes 12..24 from the hot header's unpack, against a (src, dst, sport, dport) tuple.
    pt, ingress, _ = passthrough()
    head = Struct("!BxH2xHxBH12s8xBB2xH").unpack_from
    by_bytes = dict(pt.flows.forward)
    by_tuple = {(k[:4], k[4:8], int.from_bytes(k[8:10], "big"), int.from_bytes(k[10:12], "big")): v
                for k, v in by_bytes.items()}  # fmt: skip
    quad = Struct("!4s4sHH").unpack_from
    out.append(
        ("flow key", "unpack + lookup, bytes", "g(h(p)[5])", {"g": by_bytes.get, "h": head, "p": ingress})
    )
    out.append(
        ("flow key", "unpack + lookup, tuple", "g(q(p, 12))", {"g": by_tuple.get, "q": quad, "p": ingress})
    )
    return out


def measure(table: list[Row], repeat: int, number: int) -> dict[tuple[str, str], list[float]]:
    """ns per packet of every row, ``repeat`` timings each, the rows interleaved (A B C, C B A, ...)."""
    timers = {(r[0], r[1]): timeit.Timer(r[2], globals=r[3]) for r in table}
    for timer in timers.values():
        timer.timeit(number // 10)  # warm-up
    results: dict[tuple[str, str], list[float]] = {row: [] for row in timers}
    for _, row in interleave(repeat, list(timers), alternate=True):
        results[row].append(timers[row].timeit(number) / number * 1e9)
    return results


def main() -> None:
    assert ARGS is not None
    import convey

    where = Path(convey.__file__).resolve().parent.parent
    print(f"convey from {where}  (python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f})")  # fmt: skip
    print(f"{ARGS.repeat} x {ARGS.number} packets per row, {ARGS.payload}-byte TCP payload; ns per packet\n")
    results = measure(rows(), ARGS.repeat, ARGS.number)
    print(f"{'scenario':<22}{'way':<26}{'median':>8}{'spread':>8}{'fastest':>9}")
    for (scenario, way), times in results.items():
        print(f"{scenario:<22}{way:<26}{median(times):>8.0f}{spread(times):>8.0%}{min(times):>9.0f}")
    if ARGS.json is not None:
        doc = {"src": str(where), "repeat": ARGS.repeat, "number": ARGS.number, "payload": ARGS.payload,
               "ns_per_packet": [{"scenario": s, "way": w, "runs": t} for (s, w), t in results.items()]}  # fmt: skip
        ARGS.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
