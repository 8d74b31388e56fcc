"""The passthrough (full NAT) decision for one queued packet: the verdict, the rewritten bytes, the counts.

Two directions: client -> VIP packets are rewritten to ``LB addr:eport -> server:sport``; return packets
(server -> ``LB addr:eport``) to ``VIP:vport -> client:cport``. ``decide(payload, now)`` is the queue edge's
one entry point: it tells the directions apart, answers the rewritten bytes (accept) or None (drop), counts,
and never raises. Resets the edge must send afterwards (raw socket, IP_HDRINCL) collect in ``rst_out``; the
edge clears it. ``ingress`` and ``ret`` decide one direction, in place on a bytearray, and return a
``Verdict``.

The direction: a packet whose flow key (src, dst, sport, dport) is a flow's forward key is a client packet;
then one whose key is a flow's return key is a return packet; any other packet is a client packet when its
destination is a VIP (``vips``) and a return packet otherwise (a malformed packet the same way, by its raw
destination bytes). So a flow's packets keep flowing while its VIP leaves ``vips`` (on reload).

Every packet lands in one verdict counter and every drop in one reason counter (``convey.packet.counters``).
The common packet takes the fast path (``convey.packet.fastpath``); the rest the full path here, which parses
with ``ipv4.parse`` and decides as follows.

Client packets:

- Malformed (``ipv4.Malformed``): dropped and counted: ``fragment``, ``too_long`` (the queue's copy was cut;
  never ``set_payload`` a cut copy), everything else ``malformed`` (by kind in ``parse_errors``). Packets with
  IP options are handled like any other and counted in ``ip_options``.
- Known flow: rewritten and accepted; payload bytes counted; FIN both ways or a RST starts the flow's linger.
- A SYN (without ACK, RST or FIN) of a new flow to a VIP: the frontend's ``choose`` picks a server from the
  flow hash of the client tuple, the port allocator an (LB addr, eport), and the flow is created with both
  directions' rewrites precomputed. A retransmitted SYN finds the flow and goes to the same server. A SYN for
  a flow that is closing (the client reused its port within the linger) ends the old flow and opens a new one
  when its sequence number lies beyond the old connection's; any other SYN on a known flow (SYN|FIN included)
  is forwarded and changes nothing (``convey.packet.seqcheck``).
- A RST of a known flow (either direction) closes it only when its sequence number is in the receiver's
  window (``seqcheck``); otherwise it is dropped and counted (``rst_out_of_window``), the flow unchanged.
- No healthy server (``no_server``), a full table (``table_full``) or no free port (``no_port``): the client
  is refused with a RST (RST|ACK, seq 0, ack = its seq + 1 + payload) and the SYN dropped, so it fails at
  once.
- Unknown non-SYN packet to a VIP (``unknown_flow``: the flow expired, or the balancer restarted): dropped,
  and answered with a RST (RFC 793 reset generation: seq = its ACK) unless it is a RST itself or
  ``rst_unknown`` is off. That is what the client would get from a host without the connection, and it fails
  fast instead of retransmitting for minutes.
- Not a VIP (``not_vip``: ``ingress`` was given a packet the config does not know): dropped, no RST.

ICMP (queued by the ICMP error rules only): an error quoting a packet of a flow is translated for the other
side and accepted, any other ICMP accepted unchanged (``convey.packet.icmp``, which counts it); never a change
of flow state.

Return packets: one whose (server, sport, LB addr, eport) is not a flow is dropped, counted ``wrong_server``
when some flow uses that LB addr:eport (another server, or a stale server port) and ``unknown_return``
otherwise; no RST. The first packet back from the server makes the flow ESTABLISHED.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from struct import Struct

from convey.packet.admission import RST_QUEUE_LIMIT, Admission, Chooser, queue_reset
from convey.packet.counters import PassthroughCounters, count_malformed
from convey.packet.fastpath import NO_FLOWS, Packet, compile_passthrough
from convey.packet.flows import FWD_PACKET, RET_SHIFT, Flow, FlowState, FlowTable, new_passthrough_flow
from convey.packet.icmp import PROTO_ICMP, passthrough_translator
from convey.packet.ipv4 import (
    ACK,
    FIN,
    RST,
    SYN,
    Malformed,
    Parsed,
    flow_key,
    parse,
    rewrite,
)
from convey.packet.ports import Ports
from convey.packet.seqcheck import (
    client_rst_in_window,
    new_connection,
    note_syn_ack,
    server_rst_in_window,
    wscale_of,
)

__all__ = [
    "RST_QUEUE_LIMIT",
    "Chooser",
    "FlowCallback",
    "Passthrough",
    "PassthroughCounters",
    "Verdict",
    "queue_reset",
]


class Verdict(IntEnum):
    """The netfilter verdicts (same values as NF_DROP and NF_ACCEPT)."""

    DROP = 0
    ACCEPT = 1  # accept; the payload may have been rewritten in place


FlowCallback = Callable[[Flow], None]

ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP

_DST = Struct("!4s2xH").unpack_from  # (dst addr, dst port) of an IHL-5 IPv4/TCP packet, at offset 16
_U16 = Struct("!H").unpack_from
_CLOSING = FlowState.CLOSING
_SYN_ETC = SYN | ACK | RST | FIN


def _not_fast(payload: Packet, now: float) -> None:
    """The fallback of the one-direction fast paths: None, the caller takes the full path."""
    return None


class Passthrough(Admission):
    """Sans-I/O passthrough decisions; see the module doc. One instance per queue (not thread-safe).

    ``vips`` maps (VIP addr, VIP port) to the frontend name and may be a live mapping or be replaced.
    ``lb_addrs`` are the balancer addresses used as sources towards servers; the allocator's source addresses
    must be among them. ``flows`` is fixed for the instance's life (the fast path holds its dicts).
    """

    decide: Callable[[bytes, float], bytes | None]
    """One queued packet of either direction: the bytes to accept it with (rewritten), or None to drop it. The
    compiled fast path (``convey.packet.fastpath``) falling back to the full path; never raises."""

    def __init__(
        self,
        vips: Mapping[tuple[bytes, int], str],
        lb_addrs: Sequence[bytes],
        ports: Ports,
        flows: FlowTable,
        choose: Chooser,
        *,
        rst_unknown: bool = True,
        on_flow_open: FlowCallback | None = None,
        on_flow_close: FlowCallback | None = None,
    ) -> None:
        self.lb_addrs = tuple(bytes(a) for a in lb_addrs)
        missing = [a for a in ports.source_addrs if a not in self.lb_addrs]
        if missing:
            raise ValueError(f"port allocator source addresses {missing!r} are not among lb_addrs")
        self.vips = vips
        self.ports = ports
        self.flows = flows
        self.choose = choose
        self.rst_unknown = rst_unknown
        self.on_flow_open = on_flow_open
        self.on_flow_close = on_flow_close
        self.rst_out: list[bytes] = []
        self.counters = PassthroughCounters()
        self.refused: dict[str, int] = {}  # frontend -> clients refused (no_server, table_full, no_port)
        self.parse_errors: dict[Malformed, int] = dict.fromkeys(Malformed, 0)
        self._forward = flows.forward
        self._reverse = flows.reverse
        counters = self.counters
        self._icmp = passthrough_translator(flows.forward, flows.reverse, counters)
        self.decide = compile_passthrough(
            flows.forward, flows.reverse, counters, self._decide_full, self._decide_failed
        )
        self._fast_ingress = compile_passthrough(flows.forward, NO_FLOWS, counters, _not_fast)
        self._fast_ret = compile_passthrough(NO_FLOWS, flows.reverse, counters, _not_fast)

    # -- per packet

    def ingress(self, buf: bytearray, now: float) -> int:
        """A client -> VIP packet: rewrite it towards its server in place and return the verdict."""
        try:
            out = self._fast_ingress(buf, now)
        except Exception:
            self.counters.errors += 1
            self.counters.ingress_dropped += 1
            return DROP
        if out is None:
            return self._ingress_full(buf, now)
        buf[:] = out
        return ACCEPT

    def ret(self, buf: bytearray, now: float) -> int:
        """A return packet (server -> LB addr:eport): rewritten to VIP -> client in place; the verdict."""
        try:
            out = self._fast_ret(buf, now)
        except Exception:
            self.counters.errors += 1
            self.counters.return_dropped += 1
            return DROP
        if out is None:
            return self._ret_full(buf, now)
        buf[:] = out
        return ACCEPT

    # -- housekeeping

    def expire(self, now: float) -> None:
        """Remove the flows past their timeout, release their ports, call ``on_flow_close``. Cheap when
        nothing is due; call it every few hundred milliseconds or per batch of packets."""
        for flow in self.flows.expire(now):
            self._closed(flow, now)
        self.ports.expire(now)  # port pools with nothing in use or cooling down are freed

    # -- the full path

    def _decide_full(self, payload: Packet, now: float) -> bytes | None:
        """``decide`` for what the fast path does not take: the direction (module doc), then its path."""
        buf = bytearray(payload)
        try:
            parsed = parse(buf)
            if parsed == Malformed.NOT_TCP and buf[9] == PROTO_ICMP:
                return self._icmp(buf)  # an ICMP error about a flow is translated; any ICMP accepted
            ingress = self._is_ingress(buf, parsed)
        except Exception:
            self._decide_failed(payload)
            return None
        verdict = self._ingress_full(buf, now, parsed) if ingress else self._ret_full(buf, now, parsed)
        return bytes(buf) if verdict else None

    def _decide_failed(self, payload: Packet) -> None:
        """An unexpected exception before the direction was known: counted, the packet dropped."""
        self.counters.errors += 1
        self.counters.ingress_dropped += 1
        return None

    def _is_ingress(self, buf: bytearray, parsed: Parsed | Malformed) -> bool:
        if isinstance(parsed, Malformed):  # by the raw destination bytes, as far as they go
            n = len(buf)
            if n >= 24 and buf[0] == 0x45:
                return _DST(buf, 16) in self.vips
            if n >= 24 and buf[0] >> 4 == 4:
                ihl = (buf[0] & 15) * 4
                return n >= ihl + 4 and (bytes(buf[16:20]), _U16(buf, ihl + 2)[0]) in self.vips
            return True
        key = flow_key(parsed.src, parsed.dst, parsed.sport, parsed.dport)
        if key in self._forward:
            return True
        if key in self._reverse:
            return False
        return (parsed.dst, parsed.dport) in self.vips

    def _ingress_full(self, buf: bytearray, now: float, parsed: Parsed | Malformed | None = None) -> int:
        counters = self.counters
        try:
            if parsed is None:
                parsed = parse(buf)
            if isinstance(parsed, Malformed):
                count_malformed(counters, self.parse_errors, parsed)
                counters.ingress_dropped += 1
                return DROP
            flow = self._forward.get(flow_key(parsed.src, parsed.dst, parsed.sport, parsed.dport))
            flags = parsed.flags
            if flow is not None:
                if flags & RST and not client_rst_in_window(flow, parsed):
                    counters.rst_out_of_window += 1
                    counters.ingress_dropped += 1
                    return DROP
                # only after a FIN close: a RST may have been forged (in the window by luck) and ignored
                if (
                    flags & _SYN_ETC == SYN
                    and flow.state == _CLOSING
                    and flow.fin_fwd
                    and flow.fin_ret
                    and new_connection(flow, parsed.seq)
                ):
                    self.flows.remove(flow)  # the client reuses its port for a new connection
                    self._closed(flow, now)
                    flow = None
            if flow is None:
                flow = self._open(parsed, now, buf)
                if flow is None:
                    counters.ingress_dropped += 1
                    return DROP
            rewrite(buf, parsed.ihl, flow.fwd_head[:8], flow.fwd_head[8:12], flow.ip_delta, flow.tcp_delta)
            size = parsed.payload_len
            flow.last_seen = now
            flow.count += size + FWD_PACKET
            if flags & RST:
                if flow.state != _CLOSING:
                    flow.rst_closed = True
                self.flows.close(flow, now)
            elif flags & SYN:
                pass  # a SYN never changes an existing flow (a retransmission, or the server decides)
            else:
                if flow.state == _CLOSING and flow.rst_closed:
                    self.flows.reopen(flow)  # the client goes on after "its" RST: it was not the client's
                if flags & FIN:
                    flow.fin_fwd = True
                    if flow.fin_ret:
                        self.flows.close(flow, now)
            if parsed.ihl != 20:
                counters.ip_options += 1
            counters.ingress_accepted += 1
            counters.bytes_tx += size
            return ACCEPT
        except Exception:
            counters.errors += 1
            counters.ingress_dropped += 1
            return DROP

    def _open(self, p: Parsed, now: float, buf: bytearray) -> Flow | None:
        """A new flow for this SYN, or None after counting (and maybe queueing a RST) why not."""
        counters = self.counters
        admitted = self.admit(p, self.flows.full)
        if admitted is None:
            return None
        frontend, choice, _ = admitted
        server_id, server_addr, server_port = choice
        got = self.ports.allocate(server_addr, server_port, now)
        if got is None:
            counters.no_port += 1
            self._refuse(frontend, p)
            return None
        lb_addr, eport = got
        flow = new_passthrough_flow(
            frontend, p.src, p.sport, p.dst, p.dport, server_id, server_addr, server_port, lb_addr, eport, now
        )
        flow.set_fwd_seq(p.seq + 1, 0)  # the server's window scale: known from its SYN-ACK
        flow.set_ret_seq(None, wscale_of(buf, p))
        if not self.flows.add(flow):
            # The return key is taken: the allocator and the table disagree (a bug). Refuse the client.
            self.ports.release(lb_addr, server_addr, server_port, eport, now)
            counters.errors += 1
            self._reset(p)
            return None
        counters.flows_opened += 1
        if self.on_flow_open is not None:
            try:
                self.on_flow_open(flow)
            except Exception:
                counters.callback_errors += 1
        return flow

    def _ret_full(self, buf: bytearray, now: float, parsed: Parsed | Malformed | None = None) -> int:
        counters = self.counters
        try:
            if parsed is None:
                parsed = parse(buf)
            if isinstance(parsed, Malformed):
                count_malformed(counters, self.parse_errors, parsed)
                counters.return_dropped += 1
                return DROP
            flow = self._reverse.get(flow_key(parsed.src, parsed.dst, parsed.sport, parsed.dport))
            if flow is None:
                if self.flows.local_in_use(parsed.dst, parsed.dport):
                    counters.wrong_server += 1
                else:
                    counters.unknown_return += 1
                counters.return_dropped += 1
                return DROP
            size, flags = parsed.payload_len, parsed.flags
            if flags & RST and not server_rst_in_window(flow, parsed):
                counters.rst_out_of_window += 1
                counters.return_dropped += 1
                return DROP
            if flags & (SYN | ACK) == SYN | ACK and flow.state == FlowState.EMBRYONIC:
                note_syn_ack(flow, buf, parsed)
            head, delta_ip, delta_tcp = flow.ret_head, 0xFFFF - flow.ip_delta, 0xFFFF - flow.tcp_delta
            rewrite(buf, parsed.ihl, head[:8], head[8:12], delta_ip or 0xFFFF, delta_tcp or 0xFFFF)
            flow.last_seen = now
            flow.count += (size + FWD_PACKET) << RET_SHIFT
            if flags & RST:
                if flow.state != _CLOSING:
                    flow.rst_closed = True
                self.flows.close(flow, now)
            else:
                if flow.state == _CLOSING and flow.rst_closed and not flags & SYN:
                    self.flows.reopen(flow)  # the server goes on after a RST: a forged one it ignored
                self.flows.establish(flow)
                if flags & FIN and not flags & SYN:
                    flow.fin_ret = True
                    if flow.fin_fwd:
                        self.flows.close(flow, now)
            if parsed.ihl != 20:
                counters.ip_options += 1
            counters.return_accepted += 1
            counters.bytes_rx += size
            return ACCEPT
        except Exception:
            counters.errors += 1
            counters.return_dropped += 1
            return DROP

    def _closed(self, flow: Flow, now: float) -> None:
        """Bookkeeping for a flow that left the table: its port goes back, the engine hears of it."""
        self.ports.release(flow.lb_addr, flow.server_addr, flow.server_port, flow.eport, now)
        self.counters.flows_closed += 1
        if self.on_flow_close is not None:
            try:
                self.on_flow_close(flow)
            except Exception:
                self.counters.callback_errors += 1
