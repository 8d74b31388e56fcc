"""The direct server return decision for one queued client -> VIP packet: (verdict, fwmark), rewrite in place.

Only client -> server packets pass the balancer; servers answer clients directly. Two flavours:

- ``rewrite="ip"``: the destination address (and port, when the server's differs from the VIP's) becomes the
  server's, the client source is kept, checksums are patched incrementally. The server puts the VIP back as
  the source of its replies (backend egress NAT). The fwmark returned is 0.
- ``rewrite="mac"``: the packet is not changed; the verdict carries the server's fwmark (``marks``) and the
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
(``table_full``), since DSR keeps no per-flow resource. No healthy server: the packet is dropped
(``no_server``) and the client gets a RST (RFC 793 reset generation; never for a RST), queued in ``rst_out``
as in passthrough. Malformed packets are dropped and counted as in passthrough (IP options: accepted and
counted). Nothing raises into the queue loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from convey.balancing.schedulers import flow_hash
from convey.packet.flows import Flow, FlowState, FlowTable, Rewrite
from convey.packet.ipv4 import (
    ACK,
    FIN,
    HOT_CSUM,
    HOT_CSUM_HEAD,
    HOT_HEADER,
    RST,
    SYN,
    ParseError,
    addr_to_int,
    flow_key,
    parse,
    rewrite,
)
from convey.packet.passthrough import (
    ACCEPT,
    DROP,
    RST_QUEUE_LIMIT,
    Chooser,
    FlowCallback,
    Verdict,
    queue_reset,
)

__all__ = ["REWRITES", "Dsr", "DsrCounters", "Verdict", "new_dsr_flow"]

REWRITES = ("ip", "mac")

_DROPPED = (DROP, 0)
_read_head = HOT_HEADER.unpack_from
_write_head = HOT_CSUM_HEAD.pack_into
_write_csum = HOT_CSUM.pack_into
_CLOSING = FlowState.CLOSING


@dataclass(slots=True)
class DsrCounters:
    """DSR packet-path counters; ``bytes_rx`` counts TCP payload bytes client -> server (the only direction
    seen)."""

    accepted: int = 0
    dropped: int = 0
    bytes_rx: int = 0
    rewrites: int = 0  # accepted packets rewritten (``ip`` flavour)
    ip_options: int = 0
    malformed: int = 0
    fragment: int = 0
    too_long: int = 0
    not_vip: int = 0
    no_server: int = 0
    no_mark: int = 0
    table_full: int = 0  # flows forwarded without being pinned
    rescheduled: int = 0  # non-SYN packets of unknown flows, scheduled by flow hash
    errors: int = 0
    flows_seen: int = 0
    flows_closed: int = 0
    rst_queued: int = 0
    rst_overflow: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


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
) -> Flow:
    """A DSR flow: forward rewrite to the server (``ip``) or the identity (``mac``); no return key."""
    key = flow_key(client_addr, vip_addr, client_port, vip_port)
    identity = Rewrite.between(key, key)
    fwd = (
        Rewrite.between(key, flow_key(client_addr, server_addr, client_port, server_port))
        if rewrite_ip
        else identity
    )
    return Flow(
        frontend=frontend,
        client_addr=client_addr,
        client_port=client_port,
        vip_addr=vip_addr,
        vip_port=vip_port,
        server_id=server_id,
        server_addr=server_addr,
        server_port=server_port,
        lb_addr=b"",
        eport=0,
        created=now,
        last_seen=now,
        fwd_key=key,
        ret_key=b"",
        fwd=fwd,
        ret=identity,
        fwmark=fwmark,
        verdict=(ACCEPT, 0) if rewrite_ip else (ACCEPT, fwmark),
    )


class Dsr:
    """Sans-I/O DSR decisions; see the module doc. One instance per queue (not thread-safe).

    ``vips`` maps (VIP addr, VIP port) to the frontend name; ``marks`` maps server ids to fwmarks (``mac``).
    Both may be live mappings. ``flows`` is used without return keys or ports.
    """

    def __init__(
        self,
        vips: Mapping[tuple[bytes, int], str],
        flows: FlowTable,
        choose: Chooser,
        rewrite: str = "ip",
        marks: Mapping[str, int] | None = None,
        *,
        on_flow_open: FlowCallback | None = None,
        on_flow_close: FlowCallback | None = None,
    ) -> None:
        if rewrite not in REWRITES:
            raise ValueError(f"DSR rewrite must be one of {', '.join(REWRITES)}, got {rewrite!r}")
        self.vips = vips
        self.flows = flows
        self.choose = choose
        self.rewrite = rewrite
        self.marks: Mapping[str, int] = marks if marks is not None else {}
        self.on_flow_open = on_flow_open
        self.on_flow_close = on_flow_close
        self.rst_out: list[bytes] = []
        self.counters = DsrCounters()
        self.refused: dict[str, int] = {}  # frontend -> packets refused for want of a healthy server
        self.parse_errors: dict[ParseError, int] = dict.fromkeys(ParseError, 0)
        self._rewrite_ip = rewrite == "ip"
        self._forward = flows.forward

    def decide(self, payload: bytes, now: float) -> bytes | int | None:
        """One queued client -> VIP packet, for the queue edge: ``bytes``, accept with that (rewritten) payload
        (``ip``); an ``int``, accept the packet unchanged with that fwmark (0: no mark); None, drop it. Never
        raises; resets to send afterwards collect in ``rst_out``."""
        buf = bytearray(payload)
        verdict, mark = self.ingress(buf, now)
        if not verdict:
            return None
        if mark:
            return mark
        return bytes(buf) if self._rewrite_ip else 0

    def ingress(self, buf: bytearray, now: float) -> tuple[int, int]:
        """Client -> VIP packet: (verdict, fwmark); in the ``ip`` flavour the buffer is rewritten in place."""
        try:
            n = len(buf)
            if n >= 40:
                vihl, total, frag, proto, ip_csum, key, offset, flags, tcp_csum = _read_head(buf)
                if vihl == 0x45 and total == n and proto == 6 and not frag & 0x3FFF and not flags & 7:
                    thl = offset >> 2 & 0x3C
                    if 20 <= thl <= total - 20:
                        flow = self._forward.get(key)
                        if flow is not None and flow.state:  # EMBRYONIC (0) goes the slow way, to establish
                            counters = self.counters
                            if self._rewrite_ip:
                                rw = flow.fwd
                                _write_head(buf, 10, (ip_csum - rw.ip_delta) % 0xFFFF, rw.head)
                                _write_csum(buf, 36, (tcp_csum - rw.tcp_delta) % 0xFFFF)
                                counters.rewrites += 1
                            size = total - 20 - thl
                            flow.last_seen = now
                            flow.fwd_packets += 1
                            flow.fwd_bytes += size
                            counters.accepted += 1
                            counters.bytes_rx += size
                            return flow.verdict
            return self._slow(buf, now)
        except Exception:
            self.counters.errors += 1
            self.counters.dropped += 1
            return _DROPPED

    def expire(self, now: float) -> None:
        """Remove the flows past their timeout and call ``on_flow_close``; cheap when nothing is due."""
        for flow in self.flows.expire(now):
            self._closed(flow)

    def _slow(self, buf: bytearray, now: float) -> tuple[int, int]:
        counters = self.counters
        parsed = parse(buf)
        if isinstance(parsed, ParseError):
            self.parse_errors[parsed] += 1
            if parsed == ParseError.FRAGMENT:
                counters.fragment += 1
            elif parsed == ParseError.TOO_LONG:
                counters.too_long += 1
            else:
                counters.malformed += 1
            counters.dropped += 1
            return _DROPPED
        ihl, src, dst, sport, dport, seq, ack, flags, _, size = parsed
        flow = self._forward.get(flow_key(src, dst, sport, dport))
        if flow is not None and flow.state == _CLOSING and flags & (SYN | ACK | RST) == SYN:
            self.flows.remove(flow)  # the client reuses its port for a new connection
            self._closed(flow)
            flow = None
        if flow is None:
            flow = self._open(src, dst, sport, dport, seq, ack, flags, size, now)
            if flow is None:
                counters.dropped += 1
                return _DROPPED
        elif not flags & SYN:
            self.flows.establish(flow)
        if self._rewrite_ip:
            rw = flow.fwd
            rewrite(buf, ihl, rw.addrs, rw.ports, rw.ip_delta, rw.tcp_delta)
            counters.rewrites += 1
        flow.last_seen = now
        flow.fwd_packets += 1
        flow.fwd_bytes += size
        if flags & (RST | FIN):
            self.flows.close(flow, now)
        if ihl != 20:
            counters.ip_options += 1
        counters.accepted += 1
        counters.bytes_rx += size
        return flow.verdict

    def _open(
        self,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        seq: int,
        ack: int,
        flags: int,
        size: int,
        now: float,
    ) -> Flow | None:
        """A flow for a packet of an unknown flow (pinned unless it is a RST or the table is full), or None
        after counting why not."""
        counters = self.counters
        frontend = self.vips.get((dst, dport))
        if frontend is None:
            counters.not_vip += 1
            return None
        choice = self.choose(frontend, flow_hash(addr_to_int(src), sport, addr_to_int(dst), dport))
        if choice is None:
            counters.no_server += 1
            self.refused[frontend] = self.refused.get(frontend, 0) + 1
            queued = queue_reset(self.rst_out, RST_QUEUE_LIMIT, src, dst, sport, dport, seq, ack, flags, size)
            if queued > 0:
                counters.rst_queued += 1
            elif queued < 0:
                counters.rst_overflow += 1
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
            src,
            sport,
            dst,
            dport,
            server_id,
            server_addr,
            server_port,
            now,
            self._rewrite_ip,
            fwmark,
        )
        if flags & (SYN | ACK | RST | FIN) != SYN:
            counters.rescheduled += 1
            flow.state = FlowState.ESTABLISHED
        if flags & RST:
            return flow  # forwarded, not pinned: the connection is over anyway
        if not self.flows.add(flow):
            counters.table_full += 1
            return flow
        counters.flows_seen += 1
        if self.on_flow_open is not None:
            try:
                self.on_flow_open(flow)
            except Exception:
                counters.errors += 1
        return flow

    def _closed(self, flow: Flow) -> None:
        self.counters.flows_closed += 1
        if self.on_flow_close is not None:
            try:
                self.on_flow_close(flow)
            except Exception:
                self.counters.errors += 1
