"""The flow table: one entry per TCP connection through the balancer, found from either direction. The entry,
``Flow``, is in ``convey.packet.flow``.

A flow is keyed by the 12 wire bytes (src addr, dst addr, sport, dport) of its packets (``ipv4.flow_key``):
the forward key ``client, VIP, cport, vport`` and, for passthrough, the return key ``server, LB addr, sport,
eport``. Without IP options these are bytes 12..24 of the packet, so the fast path reads the key with the same
``struct`` call that reads the header. A flat 12-byte ``bytes`` key hashes and compares in one C call:
unpack + lookup measured ~190 ns against ~230 ns for a (src, dst, sport, dport) tuple unpacked with one
``struct`` call (``bench/hotpath.py``, "flow key" rows; bench/README.md).

Lifecycle (``FlowState``): a SYN creates an EMBRYONIC flow; the first packet back from the server
(passthrough), or the client's next non-SYN packet (DSR, which sees one direction only), makes it ESTABLISHED;
FIN seen both ways or a RST either way makes it CLOSING. Each state has an idle timeout, counted from the
flow's last packet: ``syn_timeout`` (default 10 s), ``idle_timeout`` (300 s) and ``linger`` (2 s, long enough
for a retransmitted final ACK or FIN to still find the flow; packets during the linger extend it). ``expire``
removes the flows past their timeout; the caller releases their ports and updates its stats.

Expiry is lazy, so a packet only stores ``last_seen``: flows wait in buckets of 1/16 s (a list per bucket, a
heap of bucket numbers) at a deadline that is never later than the real one (``last_seen + timeout``). When a
bucket comes due its flows are checked: expired, or filed again at their real deadline. A flow that starts
closing is filed again earlier (its old entry is checked and skipped when it comes due, so a flow has at most
two entries). ``expire`` costs one comparison when no bucket is due, and looks at the bucket of ``now`` (a
sixteenth of a second of deadlines) otherwise, so flows expire exactly at their deadline.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Iterator

from convey.packet.flow import (
    FWD_PACKET,
    NO_WSCALE,
    RET_SHIFT,
    CountTables,
    DsrFlow,
    Flow,
    FlowState,
    Rewrite,
    SeqInfo,
    count_tables,
    mirror,
    new_passthrough_flow,
)

__all__ = [
    "FWD_PACKET",
    "NO_WSCALE",
    "RET_SHIFT",
    "CountTables",
    "DsrFlow",
    "Flow",
    "FlowState",
    "FlowTable",
    "Rewrite",
    "SeqInfo",
    "count_tables",
    "mirror",
    "new_passthrough_flow",
]

_BUCKETS_PER_S = 16  # expiry buckets per second


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
        self._locals: dict[bytes, array[int]] = {}  # lb addr -> flows using each port
        self._buckets: dict[int, list[Flow]] = {}  # int(deadline * _BUCKETS_PER_S) -> flows
        self._due: list[int] = []  # heap of the bucket numbers
        self.entries = 0  # flows in all buckets (a flow has one or two)

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
        fwd_key, ret_key = flow.fwd_key, flow.ret_key
        if len(self.forward) >= self.capacity or fwd_key in self.forward:
            return False
        if ret_key and ret_key in self.reverse:
            return False
        self.forward[fwd_key] = flow
        if ret_key:
            self.reverse[ret_key] = flow
            self._count_local(flow, 1)
        self._servers[flow.server_id] = self._servers.get(flow.server_id, 0) + 1
        flow.in_table = True
        self._schedule(flow, flow.last_seen + self._timeouts[flow.state])
        return True

    def remove(self, flow: Flow) -> None:
        """Take a flow out (no-op if it is not in the table). Its pending entries go stale."""
        if not flow.in_table:
            return
        flow.in_table = False
        del self.forward[flow.fwd_key]
        ret_key = flow.ret_key
        if ret_key:
            del self.reverse[ret_key]
            self._count_local(flow, -1)
        left = self._servers[flow.server_id] - 1
        if left:
            self._servers[flow.server_id] = left
        else:
            del self._servers[flow.server_id]

    def _count_local(self, flow: Flow, step: int) -> None:
        lb_addr = flow.lb_addr
        counts = self._locals.get(lb_addr)
        if counts is None:
            counts = self._locals[lb_addr] = array("I", bytes(4 * 65536))
        counts[flow.eport] += step

    def establish(self, flow: Flow) -> None:
        """EMBRYONIC -> ESTABLISHED. The timeout only grows, so the pending entry stays valid (it is early)."""
        if flow.state == FlowState.EMBRYONIC:
            flow.state = FlowState.ESTABLISHED

    def reopen(self, flow: Flow) -> None:
        """CLOSING by a RST -> ESTABLISHED: a packet after the RST showed the connection alive. The timeout only
        grows, so the pending entry stays valid (it is early)."""
        if flow.state == FlowState.CLOSING and flow.rst_closed:
            flow.rst_closed = False
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
        """Remove and return the flows past their timeout; one comparison when no bucket is due."""
        due = self._due
        current = int(now * _BUCKETS_PER_S)
        if not due or due[0] > current:
            return []
        expired: list[Flow] = []
        later: list[tuple[Flow, float]] = []
        timeouts, buckets = self._timeouts, self._buckets
        while due and due[0] <= current:
            flows = buckets.pop(heapq.heappop(due))
            self.entries -= len(flows)
            for flow in flows:
                if not flow.in_table:
                    continue  # removed, or expired by its other entry
                deadline = flow.last_seen + timeouts[flow.state]
                if deadline <= now:
                    self.remove(flow)
                    expired.append(flow)
                else:
                    later.append((flow, deadline))
        for flow, deadline in later:  # after the loop: some go back into the bucket of ``now``
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
        counts = self._locals.get(lb_addr)
        return counts is not None and 0 <= eport < 65536 and counts[eport] > 0

    def _schedule(self, flow: Flow, deadline: float) -> None:
        number = int(deadline * _BUCKETS_PER_S)
        bucket = self._buckets.get(number)
        if bucket is None:
            self._buckets[number] = [flow]
            heapq.heappush(self._due, number)
        else:
            bucket.append(flow)
        self.entries += 1
        if self.entries > 2 * len(self.forward) + 1024:
            # Entries of removed flows wait for their bucket (up to idle_timeout); drop them all at once so
            # the buckets stay within twice the table. Amortised O(1) per entry. In place: ``expire`` may be
            # iterating over one of these lists.
            self.entries = 0
            for flows in self._buckets.values():
                flows[:] = [f for f in flows if f.in_table]
                self.entries += len(flows)
