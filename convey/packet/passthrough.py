"""The passthrough (full NAT) decision for one queued packet: which verdict, and the rewrite done in place.

``ingress`` takes client -> VIP packets and rewrites them to ``LB addr:eport -> server:sport``; ``egress``
takes server -> ``LB addr:eport`` packets and rewrites them to ``VIP:vport -> client:cport``. Both return a
``Verdict``; ACCEPT means the buffer (possibly rewritten) must go back with ``set_payload`` and an accept.
Resets the I/O edge must send afterwards (raw socket, IP_HDRINCL) collect in ``rst_out``; the edge clears it.
Nothing here raises into the queue loop: an unexpected exception is counted in ``errors`` and gives DROP.

Decisions, ingress:

- Malformed packets (every ``ipv4.ParseError``) are dropped and counted: ``fragment``, ``too_long`` (the
  queue's copy was cut; never ``set_payload`` a cut copy), everything else ``malformed`` (by code in
  ``parse_errors``). Packets with IP options are handled like any other and counted in ``ip_options``.
- Known flow: rewritten and accepted; payload bytes counted; FIN both ways or a RST starts the flow's linger.
- A SYN (without ACK, RST or FIN) of a new flow to a VIP: the frontend's ``choose`` picks a server from the
  flow hash of the client tuple, the port allocator an (LB addr, eport), and the flow is created with both
  directions' rewrites precomputed. A retransmitted SYN finds the flow and goes to the same server. A SYN for
  a flow that is closing (the client reused its port within the linger) ends the old flow and opens a new one.
- No healthy server (``no_server``), a full table (``table_full``) or no free port (``no_port``): the client
  is refused with a RST (RST|ACK, seq 0, ack = its seq + 1 + payload) and the SYN dropped, so it fails at
  once.
- Unknown non-SYN packet to a VIP (``unknown_flow``: the flow expired, or the balancer restarted): dropped,
  and answered with a RST (RFC 793 reset generation: seq = its ACK) unless it is a RST itself or
  ``rst_unknown`` is off. That is what the client would get from a host without the connection, and it fails
  fast instead of retransmitting for minutes.
- Not a VIP (``not_vip``: the rules queued something the config does not know): dropped, no RST.

Decisions, egress: a packet whose (server, sport, LB addr, eport) is not a flow is dropped, counted
``wrong_server`` when some flow uses that LB addr:eport (another server, or a stale server port) and
``unknown_return`` otherwise; no RST. The first packet back from the server makes the flow ESTABLISHED.

The hot path (a packet of a known flow without SYN, FIN or RST and without IP options) reads the headers with
one ``struct`` call, finds the flow by bytes 12..24, writes the new checksums and bytes 12..24 with two
``pack_into`` calls and bumps a few counters: no ``parse`` tuple, no key building. Everything else takes the
slow path, which uses ``ipv4.parse`` and ``ipv4.rewrite``; a property test checks both paths agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from struct import Struct

from convey.balancing.schedulers import flow_hash
from convey.packet.flows import Flow, FlowState, FlowTable, new_passthrough_flow
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
    reset_for,
    rewrite,
)
from convey.packet.ports import Ports

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


# (frontend name, flow hash) -> (server id, server addr, server port), or None when no server is healthy.
Chooser = Callable[[str, int], tuple[str, bytes, int] | None]
FlowCallback = Callable[[Flow], None]

# At most this many resets wait in ``rst_out``: should the edge stop draining it, memory stays bounded.
RST_QUEUE_LIMIT = 256

ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP

_read_head = HOT_HEADER.unpack_from
_DST = Struct("!4s2xH").unpack_from  # (dst addr, dst port) of an IHL-5 IPv4/TCP packet, at offset 16
_U16 = Struct("!H").unpack_from
_write_head = HOT_CSUM_HEAD.pack_into
_write_csum = HOT_CSUM.pack_into
_CLOSING = FlowState.CLOSING


@dataclass(slots=True)
class PassthroughCounters:
    """Packet-path counters. Bytes are TCP payload bytes: ``bytes_rx`` client -> server, ``bytes_tx`` back."""

    ingress_accepted: int = 0
    ingress_dropped: int = 0
    egress_accepted: int = 0
    egress_dropped: int = 0
    bytes_rx: int = 0
    bytes_tx: int = 0
    ip_options: int = 0  # accepted (and rewritten) packets that carried IP options
    malformed: int = 0  # parse errors other than the two below
    fragment: int = 0
    too_long: int = 0  # the queue's copy of the packet was cut
    not_vip: int = 0
    unknown_flow: int = 0  # ingress, not a SYN, no flow
    unknown_return: int = 0  # egress, nobody uses that LB addr:eport
    wrong_server: int = 0  # egress, that LB addr:eport belongs to a flow with another server (or port)
    no_server: int = 0
    table_full: int = 0
    no_port: int = 0
    errors: int = 0  # unexpected exceptions (bugs), each dropped the packet
    flows_opened: int = 0
    flows_closed: int = 0
    rst_queued: int = 0
    rst_overflow: int = 0  # resets not queued because ``rst_out`` was full

    @property
    def rewrites(self) -> int:
        """Every accepted packet was rewritten."""
        return self.ingress_accepted + self.egress_accepted

    def as_dict(self) -> dict[str, int]:
        result = asdict(self)
        result["rewrites"] = self.rewrites
        return result


def queue_reset(
    out: list[bytes],
    limit: int,
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload_len: int,
) -> int:
    """Append the RST answering that segment to ``out``: 1 if queued, 0 if none is due (it was a RST), -1 if
    ``out`` already holds ``limit`` resets."""
    if flags & RST:
        return 0
    if len(out) >= limit:
        return -1
    rst = reset_for(src, dst, sport, dport, seq, ack, flags, payload_len)
    if rst is None:
        return 0
    out.append(rst)
    return 1


class Passthrough:
    """Sans-I/O passthrough decisions; see the module doc. One instance per queue (not thread-safe).

    ``vips`` maps (VIP addr, VIP port) to the frontend name and may be a live mapping. ``lb_addrs`` are the
    balancer addresses used as sources towards servers; the allocator's source addresses must be among them.
    """

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
        self.parse_errors: dict[ParseError, int] = dict.fromkeys(ParseError, 0)
        self._forward = flows.forward
        self._reverse = flows.reverse

    # -- per packet

    def decide(self, payload: bytes, now: float) -> bytes | None:
        """One queued packet of either direction: the bytes to accept it with (rewritten), or None to drop it.

        This is the one entry point of the queue edge: it tells client -> VIP packets from return packets,
        rewrites, counts, and never raises. Resets to send afterwards collect in ``rst_out``.
        """
        buf = bytearray(payload)
        try:
            n = len(buf)
            if n >= 24 and buf[0] == 0x45:
                ingress = _DST(buf, 16) in self.vips
            elif n >= 24 and buf[0] >> 4 == 4:
                ihl = (buf[0] & 15) * 4
                ingress = n >= ihl + 4 and (bytes(buf[16:20]), _U16(buf, ihl + 2)[0]) in self.vips
            else:
                ingress = True  # counted as malformed by ``ingress``
        except Exception:
            self.counters.errors += 1
            self.counters.ingress_dropped += 1
            return None
        verdict = self.ingress(buf, now) if ingress else self.egress(buf, now)
        return bytes(buf) if verdict else None

    def ingress(self, buf: bytearray, now: float) -> int:
        """Client -> VIP packet: rewrite it towards its server in place and return the verdict."""
        try:
            n = len(buf)
            if n >= 40:
                vihl, total, frag, proto, ip_csum, key, offset, flags, tcp_csum = _read_head(buf)
                if vihl == 0x45 and total == n and proto == 6 and not frag & 0x3FFF and not flags & 7:
                    thl = offset >> 2 & 0x3C
                    if 20 <= thl <= total - 20:
                        flow = self._forward.get(key)
                        if flow is not None:
                            rw = flow.fwd
                            _write_head(buf, 10, (ip_csum - rw.ip_delta) % 0xFFFF, rw.head)
                            _write_csum(buf, 36, (tcp_csum - rw.tcp_delta) % 0xFFFF)
                            size = total - 20 - thl
                            flow.last_seen = now
                            flow.fwd_packets += 1
                            flow.fwd_bytes += size
                            counters = self.counters
                            counters.ingress_accepted += 1
                            counters.bytes_rx += size
                            return ACCEPT
            return self._ingress_slow(buf, now)
        except Exception:
            self.counters.errors += 1
            self.counters.ingress_dropped += 1
            return DROP

    def egress(self, buf: bytearray, now: float) -> int:
        """Server -> LB addr:eport packet: rewrite it to VIP -> client in place and return the verdict."""
        try:
            n = len(buf)
            if n >= 40:
                vihl, total, frag, proto, ip_csum, key, offset, flags, tcp_csum = _read_head(buf)
                if vihl == 0x45 and total == n and proto == 6 and not frag & 0x3FFF and not flags & 7:
                    thl = offset >> 2 & 0x3C
                    if 20 <= thl <= total - 20:
                        flow = self._reverse.get(key)
                        if flow is not None:
                            rw = flow.ret
                            _write_head(buf, 10, (ip_csum - rw.ip_delta) % 0xFFFF, rw.head)
                            _write_csum(buf, 36, (tcp_csum - rw.tcp_delta) % 0xFFFF)
                            size = total - 20 - thl
                            flow.last_seen = now
                            flow.ret_packets += 1
                            flow.ret_bytes += size
                            counters = self.counters
                            counters.egress_accepted += 1
                            counters.bytes_tx += size
                            return ACCEPT
            return self._egress_slow(buf, now)
        except Exception:
            self.counters.errors += 1
            self.counters.egress_dropped += 1
            return DROP

    # -- housekeeping

    def expire(self, now: float) -> None:
        """Remove the flows past their timeout, release their ports, call ``on_flow_close``. Cheap when
        nothing is due; call it every few hundred milliseconds or per batch of packets."""
        for flow in self.flows.expire(now):
            self._closed(flow, now)

    # -- slow paths

    def _ingress_slow(self, buf: bytearray, now: float) -> int:
        counters = self.counters
        parsed = parse(buf)
        if isinstance(parsed, ParseError):
            self._count_parse_error(parsed)
            counters.ingress_dropped += 1
            return DROP
        ihl, src, dst, sport, dport, seq, ack, flags, _, size = parsed
        flow = self._forward.get(flow_key(src, dst, sport, dport))
        if flow is not None and flow.state == _CLOSING and flags & (SYN | ACK | RST) == SYN:
            self.flows.remove(flow)
            self._closed(flow, now)
            flow = None
        if flow is None:
            flow = self._open(src, dst, sport, dport, seq, ack, flags, size, now)
            if flow is None:
                counters.ingress_dropped += 1
                return DROP
        rw = flow.fwd
        rewrite(buf, ihl, rw.addrs, rw.ports, rw.ip_delta, rw.tcp_delta)
        flow.last_seen = now
        flow.fwd_packets += 1
        flow.fwd_bytes += size
        if flags & RST:
            self.flows.close(flow, now)
        elif flags & FIN:
            flow.fin_fwd = True
            if flow.fin_ret:
                self.flows.close(flow, now)
        if ihl != 20:
            counters.ip_options += 1
        counters.ingress_accepted += 1
        counters.bytes_rx += size
        return ACCEPT

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
        """A new flow for this SYN, or None after counting (and maybe queueing a RST) why not."""
        counters = self.counters
        frontend = self.vips.get((dst, dport))
        if frontend is None:
            counters.not_vip += 1
            return None
        if flags & (SYN | ACK | RST | FIN) != SYN:
            counters.unknown_flow += 1
            if self.rst_unknown:
                self._reset(src, dst, sport, dport, seq, ack, flags, size)
            return None
        if self.flows.full:
            counters.table_full += 1
            self.refused[frontend] = self.refused.get(frontend, 0) + 1
            self._reset(src, dst, sport, dport, seq, ack, flags, size)
            return None
        choice = self.choose(frontend, flow_hash(addr_to_int(src), sport, addr_to_int(dst), dport))
        if choice is None:
            counters.no_server += 1
            self.refused[frontend] = self.refused.get(frontend, 0) + 1
            self._reset(src, dst, sport, dport, seq, ack, flags, size)
            return None
        server_id, server_addr, server_port = choice
        got = self.ports.allocate(server_addr, server_port, now)
        if got is None:
            counters.no_port += 1
            self.refused[frontend] = self.refused.get(frontend, 0) + 1
            self._reset(src, dst, sport, dport, seq, ack, flags, size)
            return None
        lb_addr, eport = got
        flow = new_passthrough_flow(
            frontend, src, sport, dst, dport, server_id, server_addr, server_port, lb_addr, eport, now
        )
        if not self.flows.add(flow):
            # The return key is taken: the allocator and the table disagree (a bug). Refuse the client.
            self.ports.release(lb_addr, server_addr, server_port, eport, now)
            counters.errors += 1
            self._reset(src, dst, sport, dport, seq, ack, flags, size)
            return None
        counters.flows_opened += 1
        if self.on_flow_open is not None:
            try:
                self.on_flow_open(flow)
            except Exception:
                counters.errors += 1
        return flow

    def _egress_slow(self, buf: bytearray, now: float) -> int:
        counters = self.counters
        parsed = parse(buf)
        if isinstance(parsed, ParseError):
            self._count_parse_error(parsed)
            counters.egress_dropped += 1
            return DROP
        ihl, src, dst, sport, dport, _, _, flags, _, size = parsed
        flow = self._reverse.get(flow_key(src, dst, sport, dport))
        if flow is None:
            if self.flows.local_in_use(dst, dport):
                counters.wrong_server += 1
            else:
                counters.unknown_return += 1
            counters.egress_dropped += 1
            return DROP
        rw = flow.ret
        rewrite(buf, ihl, rw.addrs, rw.ports, rw.ip_delta, rw.tcp_delta)
        flow.last_seen = now
        flow.ret_packets += 1
        flow.ret_bytes += size
        if flags & RST:
            self.flows.close(flow, now)
        else:
            self.flows.establish(flow)
            if flags & FIN:
                flow.fin_ret = True
                if flow.fin_fwd:
                    self.flows.close(flow, now)
        if ihl != 20:
            counters.ip_options += 1
        counters.egress_accepted += 1
        counters.bytes_tx += size
        return ACCEPT

    def _closed(self, flow: Flow, now: float) -> None:
        """Bookkeeping for a flow that left the table: its port goes back, the engine hears of it."""
        self.ports.release(flow.lb_addr, flow.server_addr, flow.server_port, flow.eport, now)
        self.counters.flows_closed += 1
        if self.on_flow_close is not None:
            try:
                self.on_flow_close(flow)
            except Exception:
                self.counters.errors += 1

    def _reset(
        self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, size: int
    ) -> None:
        queued = queue_reset(self.rst_out, RST_QUEUE_LIMIT, src, dst, sport, dport, seq, ack, flags, size)
        if queued > 0:
            self.counters.rst_queued += 1
        elif queued < 0:
            self.counters.rst_overflow += 1

    def _count_parse_error(self, error: ParseError) -> None:
        self.parse_errors[error] += 1
        if error == ParseError.FRAGMENT:
            self.counters.fragment += 1
        elif error == ParseError.TOO_LONG:
            self.counters.too_long += 1
        else:
            self.counters.malformed += 1
