"""The flow table: one entry per TCP connection through the balancer, found from either direction.

A flow is keyed by the 12 wire bytes (src addr, dst addr, sport, dport) of its packets (``ipv4.flow_key``):
the forward key ``client, VIP, cport, vport`` and, for passthrough, the return key ``server, LB addr, sport,
eport``. Without IP options these are bytes 12..24 of the packet, so the fast path reads the key with the same
``struct`` call that reads the header. A flat 12-byte ``bytes`` key hashes and compares in one C call:
unpack + lookup measured ~190 ns against ~230 ns for a (src, dst, sport, dport) tuple unpacked with one
``struct`` call (``bench/hotpath.py``, "flow key" rows; bench/README.md).

Each direction's rewrite (``Rewrite``: the new address, port and header bytes, and both checksum deltas) is
computed once, when the flow is created, and applied to every packet.

Lifecycle (``FlowState``): a SYN creates an EMBRYONIC flow; the first packet back from the server
(passthrough), or the client's next non-SYN packet (DSR, which sees one direction only), makes it ESTABLISHED;
FIN seen both ways or a RST either way makes it CLOSING. Each state has an idle timeout, counted from the
flow's last packet: ``syn_timeout`` (default 10 s), ``idle_timeout`` (300 s) and ``linger`` (2 s, long enough
for a retransmitted final ACK or FIN to still find the flow; packets during the linger extend it). ``expire``
removes the flows past their timeout; the caller releases their ports and updates its stats.

Expiry is lazy, so a packet only stores ``last_seen``: a heap holds one entry per flow with a deadline that is
never later than the real one (``last_seen + timeout``). When an entry comes due the flow is checked: it is
expired, or its entry is pushed again at its real deadline. A flow that starts closing gets an earlier entry
(its old one goes stale and is skipped). ``expire`` costs one comparison when nothing is due; a busy
established flow costs one re-check per ``idle_timeout``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from convey.packet.checksum import delta
from convey.packet.ipv4 import flow_key

__all__ = ["Flow", "FlowState", "FlowTable", "Rewrite", "new_passthrough_flow"]


class FlowState(IntEnum):
    EMBRYONIC = 0
    ESTABLISHED = 1
    CLOSING = 2


@dataclass(frozen=True, slots=True)
class Rewrite:
    """What one direction's packets are rewritten to, and the checksum deltas that rewrite implies.

    ``addrs`` (new src + dst) goes at IPv4 offset 12, ``ports`` (new sport + dport) at TCP offset 0; ``head``
    is both, i.e. bytes 12..24 of a packet without IP options. ``ip_delta`` covers the addresses,
    ``tcp_delta`` the addresses (pseudo-header) and the ports.
    """

    addrs: bytes
    ports: bytes
    head: bytes
    ip_delta: int
    tcp_delta: int

    @classmethod
    def between(cls, old_key: bytes, new_key: bytes) -> Rewrite:
        """The rewrite turning packets keyed ``old_key`` into packets keyed ``new_key`` (flow keys)."""
        if len(old_key) != 12 or len(new_key) != 12:
            raise ValueError("flow keys are 12 bytes")
        return cls(
            new_key[:8], new_key[8:], new_key, delta(old_key[:8], new_key[:8]), delta(old_key, new_key)
        )


@dataclass(slots=True, eq=False)
class Flow:
    """One connection. Mutable: the handlers update its counters, state and ``last_seen`` per packet.

    ``fwd`` rewrites client -> VIP packets, ``ret`` server -> balancer packets (passthrough only: a DSR flow
    has no return key and ``ret`` is the identity). ``verdict`` is the (verdict, fwmark) pair a DSR flow's
    packets get, built once. ``lb_addr`` and ``eport`` are empty for DSR.
    """

    frontend: str
    client_addr: bytes
    client_port: int
    vip_addr: bytes
    vip_port: int
    server_id: str
    server_addr: bytes
    server_port: int
    lb_addr: bytes
    eport: int
    created: float
    fwd_key: bytes
    ret_key: bytes
    fwd: Rewrite
    ret: Rewrite
    last_seen: float = 0.0
    state: int = FlowState.EMBRYONIC
    fwd_packets: int = 0
    fwd_bytes: int = 0
    ret_packets: int = 0
    ret_bytes: int = 0
    fin_fwd: bool = False
    fin_ret: bool = False
    fwmark: int = 0
    verdict: tuple[int, int] = (1, 0)
    # Owned by FlowTable: whether the flow is in it, and the sequence number of its authoritative heap entry.
    in_table: bool = False
    expiry_seq: int = 0


def new_passthrough_flow(
    frontend: str,
    client_addr: bytes,
    client_port: int,
    vip_addr: bytes,
    vip_port: int,
    server_id: str,
    server_addr: bytes,
    server_port: int,
    lb_addr: bytes,
    eport: int,
    now: float,
) -> Flow:
    """A full-NAT flow: ``client:cport -> VIP:vport`` becomes ``LB:eport -> server:sport`` and back."""
    fwd_key = flow_key(client_addr, vip_addr, client_port, vip_port)
    ret_key = flow_key(server_addr, lb_addr, server_port, eport)
    return Flow(
        frontend=frontend,
        client_addr=client_addr,
        client_port=client_port,
        vip_addr=vip_addr,
        vip_port=vip_port,
        server_id=server_id,
        server_addr=server_addr,
        server_port=server_port,
        lb_addr=lb_addr,
        eport=eport,
        created=now,
        last_seen=now,
        fwd_key=fwd_key,
        ret_key=ret_key,
        fwd=Rewrite.between(fwd_key, flow_key(lb_addr, server_addr, eport, server_port)),
        ret=Rewrite.between(ret_key, flow_key(vip_addr, client_addr, vip_port, client_port)),
    )


class FlowTable:
    """Flows by forward key (``forward``) and by return key (``reverse``), with capacity and expiry.

    ``forward`` and ``reverse`` are plain dicts that the fast path reads directly; change them
    only through ``add`` and ``remove``.
    """

    def __init__(
        self,
        capacity: int,
        syn_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        linger: float = 2.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.syn_timeout = syn_timeout
        self.idle_timeout = idle_timeout
        self.linger = linger
        self.forward: dict[bytes, Flow] = {}
        self.reverse: dict[bytes, Flow] = {}
        self._timeouts = (syn_timeout, idle_timeout, linger)  # indexed by FlowState
        self._servers: dict[str, int] = {}
        self._locals: dict[tuple[bytes, int], int] = {}  # (lb addr, eport) -> flows using it
        self._heap: list[tuple[float, int, Flow]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self.forward)

    def __iter__(self) -> Iterator[Flow]:
        """The flows at the time of the call (a snapshot, so the table may change while iterating)."""
        return iter(tuple(self.forward.values()))

    @property
    def full(self) -> bool:
        return len(self.forward) >= self.capacity

    def add(self, flow: Flow) -> bool:
        """Insert a new flow; False (and nothing changes) when the table is full or a key is taken."""
        if len(self.forward) >= self.capacity or flow.fwd_key in self.forward:
            return False
        if flow.ret_key and flow.ret_key in self.reverse:
            return False
        self.forward[flow.fwd_key] = flow
        if flow.ret_key:
            self.reverse[flow.ret_key] = flow
        if flow.eport:
            local = (flow.lb_addr, flow.eport)
            self._locals[local] = self._locals.get(local, 0) + 1
        self._servers[flow.server_id] = self._servers.get(flow.server_id, 0) + 1
        flow.in_table = True
        self._schedule(flow, flow.last_seen + self._timeouts[flow.state])
        return True

    def remove(self, flow: Flow) -> None:
        """Take a flow out (no-op if it is not in the table). Its pending heap entries go stale."""
        if not flow.in_table:
            return
        flow.in_table = False
        del self.forward[flow.fwd_key]
        if flow.ret_key:
            del self.reverse[flow.ret_key]
        if flow.eport:
            local = (flow.lb_addr, flow.eport)
            left = self._locals[local] - 1
            if left:
                self._locals[local] = left
            else:
                del self._locals[local]
        left = self._servers[flow.server_id] - 1
        if left:
            self._servers[flow.server_id] = left
        else:
            del self._servers[flow.server_id]

    def establish(self, flow: Flow) -> None:
        """EMBRYONIC -> ESTABLISHED. The timeout only grows, so the pending heap entry stays valid (it is
        early)."""
        if flow.state == FlowState.EMBRYONIC:
            flow.state = FlowState.ESTABLISHED

    def close(self, flow: Flow, now: float) -> None:
        """Start the linger: the flow is removed ``linger`` seconds after its last packet."""
        if flow.state == FlowState.CLOSING:
            return
        flow.state = FlowState.CLOSING
        if now > flow.last_seen:
            flow.last_seen = now
        if flow.in_table:
            self._schedule(flow, flow.last_seen + self.linger)

    def deadline(self, flow: Flow) -> float:
        """When the flow expires if no further packet arrives."""
        return flow.last_seen + self._timeouts[flow.state]

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows past their timeout; one comparison when nothing is due."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return []
        expired: list[Flow] = []
        timeouts = self._timeouts
        while heap and heap[0][0] <= now:
            _, seq, flow = heapq.heappop(heap)
            if not flow.in_table or flow.expiry_seq != seq:
                continue  # stale: removed, or rescheduled earlier on close
            deadline = flow.last_seen + timeouts[flow.state]
            if deadline <= now:
                self.remove(flow)
                expired.append(flow)
            else:
                self._schedule(flow, deadline)
        return expired

    def per_server(self) -> dict[str, int]:
        """Flow counts by server id (servers without flows are absent)."""
        return dict(self._servers)

    def count_for(self, server_id: str) -> int:
        return self._servers.get(server_id, 0)

    def local_in_use(self, lb_addr: bytes, eport: int) -> bool:
        """Whether some flow uses ``lb_addr:eport`` (towards any server): tells a packet from the wrong server
        apart from one for a port nobody uses."""
        return (lb_addr, eport) in self._locals

    def _schedule(self, flow: Flow, deadline: float) -> None:
        self._seq += 1
        flow.expiry_seq = self._seq
        heap = self._heap
        heapq.heappush(heap, (deadline, self._seq, flow))
        if len(heap) > 2 * len(self.forward) + 1024:
            # Entries of removed flows wait for their deadline (up to idle_timeout); drop them all at once so
            # the heap stays within twice the table. Amortised O(1) per push.
            # In place: ``expire`` may be iterating over this very list.
            heap[:] = [e for e in heap if e[2].in_table and e[2].expiry_seq == e[1]]
            heapq.heapify(heap)
