"""The direct server return decision for one queued client -> VIP packet: verdict, rewrite, counts.

Only client -> server packets pass the balancer; servers answer clients directly. ``decide(payload, now)`` is
the queue edge's one entry point; ``ingress`` decides in place on a bytearray and returns (verdict, fwmark).
Two flavours (``convey.modes.Rewrite``):

- ``Rewrite.IP``: the destination address (and port, when the server's differs from the VIP's) becomes the
  server's, the client source is kept, checksums are patched incrementally; ``decide`` answers the rewritten
  bytes. The server puts the VIP back as the source of its replies (backend egress NAT).
- ``Rewrite.MAC``: the packet is not changed; ``decide`` answers the server's fwmark (``marks``) and the
  kernel's policy routing (``ip rule fwmark N lookup T``, ``default via <server>`` in T) sends the frame,
  still addressed to the VIP, to that server. The server's port is ignored: the server listens on the VIP's
  port. A server without a mark cannot be reached: its packets are dropped and counted (``no_mark``).

Scheduling: a new flow's server comes from ``choose(frontend, flow_hash(client tuple))``; with Maglev the same
client tuple maps to the same server on every balancer and after a restart. The flow table pins existing flows
to their server, so a change of the server set moves no established connection. A non-SYN packet of an unknown
flow (after a balancer restart, or from a flow that expired while idle) is scheduled by the flow hash just
like a SYN and pinned as ESTABLISHED (``rescheduled``), not dropped: that is what keeps connections alive
across restarts. A RST of an unknown flow is forwarded the same way but not pinned.

Lifecycle, seen from one direction: SYN -> EMBRYONIC; the client's next packet -> ESTABLISHED; the client's
FIN or a RST -> CLOSING, removed after the table's linger without packets (the client's ACKs while the server
still sends keep it alive). A full table does not refuse anyone here: the flow is forwarded unpinned
(``unpinned``), since DSR keeps no per-flow resource. No healthy server: the packet is dropped
(``no_server``) and the client gets a RST (RFC 793 reset generation; never for a RST), queued in ``rst_out``
as in passthrough. Malformed packets are dropped and counted as in passthrough (IP options: accepted and
counted). The counters are ``convey.packet.counters``'; the common packet takes ``convey.packet.fastpath``.
Nothing raises into the queue loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

from convey import modes
from convey.balancing.schedulers import flow_hash
from convey.packet.counters import DsrCounters, count_malformed
from convey.packet.fastpath import Packet, compile_dsr
from convey.packet.flows import FWD_PACKET, DsrFlow, Flow, FlowState, FlowTable
from convey.packet.ipv4 import ACK, FIN, RST, SYN, Malformed, Parsed, addr_to_int, flow_key, parse, rewrite
from convey.packet.passthrough import (
    ACCEPT,
    DROP,
    RST_QUEUE_LIMIT,
    Chooser,
    FlowCallback,
    Verdict,
    queue_reset,
)

__all__ = ["Dsr", "DsrCounters", "Verdict", "new_dsr_flow"]

_DROPPED = (DROP, 0)
_CLOSING = FlowState.CLOSING


def _not_fast(payload: Packet, now: float) -> None:
    """The fallback of ``ingress``'s fast path: None, ``ingress`` takes the full path."""
    return None


def new_dsr_flow(
    frontend: str,
    client_addr: bytes,
    client_port: int,
    vip_addr: bytes,
    vip_port: int,
    server_id: str,
    server_addr: bytes,
    server_port: int,
    now: float,
    rewrite_ip: bool,
    fwmark: int,
) -> DsrFlow:
    """A DSR flow: forward rewrite to the server (``ip``; ``mac`` never rewrites, the head only names the
    server); no return key."""
    key = flow_key(client_addr, vip_addr, client_port, vip_port)
    head = flow_key(client_addr, server_addr, client_port, server_port)
    flow = DsrFlow(frontend, server_id, key, head, now, fwmark)
    flow.verdict = (ACCEPT, 0) if rewrite_ip else (ACCEPT, fwmark)
    return flow


class Dsr:
    """Sans-I/O DSR decisions; see the module doc. One instance per queue (not thread-safe).

    ``vips`` maps (VIP addr, VIP port) to the frontend name; ``marks`` maps server ids to fwmarks (``mac``).
    Both may be live mappings or be replaced. ``flows`` is used without return keys or ports, and is fixed for
    the instance's life (the fast path holds its dict).

    ``pin=False`` (flow offload, ``convey.dataplane.dsr_offload_plane``): nothing is pinned; each queued packet
    of an unknown flow (a SYN, a retransmitted SYN, a packet whose conntrack entry is gone) is decided afresh by
    the flow hash and its flow goes to ``on_flow_open`` before ``decide`` returns (the edge writes the kernel's
    entry from it). ``flows_opened`` counts pinned flows only.
    """

    decide: Callable[[bytes, float], bytes | int | None]
    """One queued client -> VIP packet, for the queue edge: ``bytes``, accept with that (rewritten) payload
    (``ip``); an ``int``, accept the packet unchanged with that fwmark (0: no mark); None, drop it. The
    compiled fast path (``convey.packet.fastpath``) falling back to the full path; never raises. Resets to
    send afterwards collect in ``rst_out``."""

    def __init__(
        self,
        vips: Mapping[tuple[bytes, int], str],
        flows: FlowTable,
        choose: Chooser,
        rewrite: modes.Rewrite | str = modes.Rewrite.IP,
        marks: Mapping[str, int] | None = None,
        *,
        on_flow_open: FlowCallback | None = None,
        on_flow_close: FlowCallback | None = None,
        pin: bool = True,
    ) -> None:
        if rewrite not in tuple(modes.Rewrite):
            kinds = ", ".join(modes.Rewrite)
            raise ValueError(f"DSR rewrite must be one of {kinds}, got {rewrite!r}")
        self.vips = vips
        self.flows = flows
        self.choose = choose
        self.rewrite = modes.Rewrite(rewrite)
        self.marks: Mapping[str, int] = marks if marks is not None else {}
        self.on_flow_open = on_flow_open
        self.on_flow_close = on_flow_close
        self.pin = pin
        self.rst_out: list[bytes] = []
        self.counters = DsrCounters()
        self.refused: dict[str, int] = {}  # frontend -> packets refused for want of a healthy server
        self.parse_errors: dict[Malformed, int] = dict.fromkeys(Malformed, 0)
        self._rewrite_ip = self.rewrite == modes.Rewrite.IP
        self._forward = flows.forward
        counters, ip = self.counters, self._rewrite_ip
        self.decide = compile_dsr(flows.forward, counters, ip, self._decide_full, self._decide_failed)
        self._fast = compile_dsr(flows.forward, counters, ip, _not_fast)

    def ingress(self, buf: bytearray, now: float) -> tuple[int, int]:
        """Client -> VIP packet: (verdict, fwmark); in the ``ip`` flavour the buffer is rewritten in place."""
        try:
            out = self._fast(buf, now)
        except Exception:
            self._decide_failed(buf)
            return _DROPPED
        if out is None:
            return self._full(buf, now)
        if isinstance(out, int):
            return (ACCEPT, out)
        buf[:] = out
        return (ACCEPT, 0)

    def expire(self, now: float) -> None:
        """Remove the flows past their timeout and call ``on_flow_close``; cheap when nothing is due."""
        for flow in self.flows.expire(now):
            self._closed(flow)

    def _decide_full(self, payload: Packet, now: float) -> bytes | int | None:
        buf = bytearray(payload)
        verdict, mark = self._full(buf, now)
        if not verdict:
            return None
        if mark:
            return mark
        return bytes(buf) if self._rewrite_ip else 0

    def _decide_failed(self, payload: Packet) -> None:
        self.counters.errors += 1
        self.counters.dropped += 1

    def _full(self, buf: bytearray, now: float) -> tuple[int, int]:
        """Every packet the fast path does not take (module doc)."""
        counters = self.counters
        try:
            parsed = parse(buf)
            if isinstance(parsed, Malformed):
                count_malformed(counters, self.parse_errors, parsed)
                counters.dropped += 1
                return _DROPPED
            flags = parsed.flags
            flow = self._forward.get(flow_key(parsed.src, parsed.dst, parsed.sport, parsed.dport))
            if flow is not None and flow.state == _CLOSING and flags & (SYN | ACK | RST | FIN) == SYN:
                self.flows.remove(flow)  # the client reuses its port for a new connection
                self._closed(flow)
                flow = None
            if flow is None:
                flow = self._open(parsed, now)
                if flow is None:
                    counters.dropped += 1
                    return _DROPPED
            elif not flags & SYN:
                self.flows.establish(flow)
            if self._rewrite_ip:
                head = flow.fwd_head
                rewrite(buf, parsed.ihl, head[:8], head[8:12], flow.ip_delta, flow.tcp_delta)
                counters.rewrites += 1
            size = parsed.payload_len
            flow.last_seen = now
            flow.count += size + FWD_PACKET
            if flags & (RST | FIN) and not flags & SYN:
                self.flows.close(flow, now)
            if parsed.ihl != 20:
                counters.ip_options += 1
            counters.accepted += 1
            counters.bytes_tx += size
            return cast("DsrFlow", flow).verdict
        except Exception:
            self._decide_failed(buf)
            return _DROPPED

    def _open(self, p: Parsed, now: float) -> Flow | None:
        """A flow for a packet of an unknown flow (pinned unless it is a RST or the table is full), or None
        after counting why not."""
        counters = self.counters
        frontend = self.vips.get((p.dst, p.dport))
        if frontend is None:
            counters.not_vip += 1
            return None
        choice = self.choose(frontend, flow_hash(addr_to_int(p.src), p.sport, addr_to_int(p.dst), p.dport))
        if choice is None:
            counters.no_server += 1
            self._refuse(frontend, p)
            return None
        server_id, server_addr, server_port = choice
        fwmark = 0
        if not self._rewrite_ip:
            mark = self.marks.get(server_id)
            if mark is None:
                counters.no_mark += 1
                return None
            fwmark = mark
        flow = new_dsr_flow(
            frontend,
            p.src,
            p.sport,
            p.dst,
            p.dport,
            server_id,
            server_addr,
            server_port,
            now,
            self._rewrite_ip,
            fwmark,
        )
        if p.flags & (SYN | ACK | RST | FIN) != SYN:
            counters.rescheduled += 1
            flow.state = FlowState.ESTABLISHED
        if p.flags & RST:
            return flow  # forwarded, not pinned: the connection is over anyway
        if not self.pin:  # offload: the kernel's conntrack entry holds the connection, not our table
            self._opened(flow)
            return flow
        if not self.flows.add(flow):
            counters.unpinned += 1
            return flow
        counters.flows_opened += 1
        self._opened(flow)
        return flow

    def _opened(self, flow: Flow) -> None:
        if self.on_flow_open is not None:
            try:
                self.on_flow_open(flow)
            except Exception:
                self.counters.callback_errors += 1

    def _refuse(self, frontend: str, p: Parsed) -> None:
        """The client of ``frontend`` is turned away (the reason is counted): ``refused``, and a RST."""
        self.refused[frontend] = self.refused.get(frontend, 0) + 1
        queued = queue_reset(self.rst_out, RST_QUEUE_LIMIT, p)
        if queued > 0:
            self.counters.rst_queued += 1
        elif queued < 0:
            self.counters.rst_overflow += 1

    def _closed(self, flow: Flow) -> None:
        self.counters.flows_closed += 1
        if self.on_flow_close is not None:
            try:
                self.on_flow_close(flow)
            except Exception:
                self.counters.callback_errors += 1
