"""ICMP errors about NATed TCP flows: parse one, find the flow it quotes, rewrite it for the other side.

An ICMP error (destination unreachable, type 3, including "fragmentation needed", code 4, which path-MTU
discovery depends on; time exceeded, 11; parameter problem, 12) quotes the IPv4 header and at least the first
8 bytes of the packet that caused it (RFC 792; Linux and RFC 1812 routers quote up to 576 bytes in all), and
is addressed to that packet's source. Through a full NAT the quoted packet is one the balancer rewrote, so the
error must be rewritten too before its real sender can use it: the quoted addresses and ports become the ones
that sender used, and the outer destination becomes that sender.

``translate(buf, lookup)`` does that in place on a raw IPv4 packet (as the queue hands it over). ``lookup``
maps the quoted packet's 12-byte flow key (src, dst, sport, dport: ``ipv4.flow_key``) to the key the same
packet had on the other side of the balancer, or None when no flow has it. The rewrite:

- quoted source, destination and ports -> the new key; the quoted IPv4 checksum and, when the quote holds it
  (18 bytes of TCP header or more), the quoted TCP checksum are updated incrementally (RFC 1624; the quote is
  usually cut short, so the TCP checksum cannot be recomputed, and a router may have quoted a header whose
  checksum no longer matches: an incremental update keeps whatever it was);
- outer destination -> the new key's source (the quoted packet's sender), outer source -> the new key's
  destination (the address that sender talked to). This is what the kernel's NAT does
  (``nf_nat_icmp_reply_translation``: the outer addresses become the inverse of the connection's tuple on
  the far side): the receiver sees the error come from its peer, never from a router behind the balancer,
  whose address may be private or unroutable from there, and the rewritten packet carries one of the
  balancer's addresses as source, which ``accept_local`` already allows;
- the ICMP checksum (over the whole ICMP message) and the outer IPv4 checksum, incrementally.

The rest is left as it is: the type, code, the "fragmentation needed" next-hop MTU (the rewrite changes no
header size, so the client's packets are as large on both sides and the value holds as is), the parameter
problem pointer, the quote's other bytes, TTL.

The outcome (``Outcome``): ``TRANSLATED``; ``UNRELATED`` (valid, but not an error about a flow we know: echo
and other types, a quote of UDP, of a non-first fragment, an error not addressed to the quoted packet's
source, a flow ``lookup`` does not know); ``MALFORMED`` (not IPv4/ICMP, cut, a fragment, an error whose quote
is too short to hold the ports). Only ``TRANSLATED`` changes ``buf``. Nothing here raises for any input, and
nothing here touches flow state: an ICMP error, forged or not, is translated at most, so it can never end a
flow (the endpoint's own stack judges it; Linux ignores an error whose quoted sequence number is outside
what it has in flight).

``full_nat_lookup`` is passthrough's ``lookup`` over the flow table; ``passthrough_translator`` is what
``Passthrough.decide`` calls for a queued ICMP packet (the slow path: the fast path only takes TCP): translate,
count, accept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import IntEnum
from struct import Struct

from convey.packet.checksum import apply, delta
from convey.packet.counters import PassthroughCounters
from convey.packet.flows import Flow, mirror

__all__ = [
    "ERROR_TYPES",
    "PROTO_ICMP",
    "Lookup",
    "Outcome",
    "full_nat_lookup",
    "passthrough_translator",
    "translate",
]

PROTO_ICMP = 1
_PROTO_TCP = 6
DEST_UNREACH, TIME_EXCEEDED, PARAMETER_PROBLEM = 3, 11, 12
ERROR_TYPES = frozenset({DEST_UNREACH, TIME_EXCEEDED, PARAMETER_PROBLEM})

Lookup = Callable[[bytes], bytes | None]
"""The quoted packet's flow key -> its key on the other side of the balancer, or None (no such flow)."""


class Outcome(IntEnum):
    TRANSLATED = 1
    UNRELATED = 2
    MALFORMED = 3


_IP = Struct("!BxH2xHxBH8s")  # version/IHL, total length, flags/fragment offset, protocol, checksum, src+dst
_U16 = Struct("!H")
_ADDRS = Struct("!8s")
_PORTS = Struct("!4s")
_TCP_CHECKSUM = 16  # into the TCP header
_FRAGMENT = 0x3FFF  # MF and the fragment offset
_OFFSET = 0x1FFF  # the fragment offset alone


def translate(buf: bytearray, lookup: Lookup) -> Outcome:
    """Translate the ICMP error in ``buf`` in place (module doc); the outcome. Never raises."""
    try:
        return _translate(buf, lookup)
    except Exception:  # defensive: the checks below leave nothing to raise, a bug must not either
        return Outcome.MALFORMED


def _translate(buf: bytearray, lookup: Lookup) -> Outcome:
    """The checks in order; ~45 lines: one pass over the headers, each check next to the bytes it reads."""
    n = len(buf)
    if n < 20:
        return Outcome.MALFORMED
    vihl, total, frag, proto, ip_csum, outer = _IP.unpack_from(buf)
    ihl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or ihl < 20 or proto != PROTO_ICMP or total != n or frag & _FRAGMENT:
        return Outcome.MALFORMED
    if n < ihl + 8:  # type, code, checksum, 4 bytes of rest (unused, MTU, pointer)
        return Outcome.MALFORMED
    if buf[ihl] not in ERROR_TYPES:
        return Outcome.UNRELATED
    q = ihl + 8  # the quoted packet
    if n < q + 20:
        return Outcome.MALFORMED
    qvihl, _, qfrag, qproto, q_csum, quoted_addrs = _IP.unpack_from(buf, q)
    qihl = (qvihl & 0x0F) << 2
    if qvihl >> 4 != 4 or qihl < 20:
        return Outcome.MALFORMED
    if qproto != _PROTO_TCP or qfrag & _OFFSET:
        return Outcome.UNRELATED  # not TCP, or no ports to find a flow by
    t = q + qihl  # the quoted TCP header
    if n < t + 4:
        return Outcome.MALFORMED
    if outer[4:] != quoted_addrs[:4]:
        return Outcome.UNRELATED  # an error goes to the quoted packet's source
    old_key = bytes(quoted_addrs + buf[t : t + 4])
    new_key = lookup(old_key)
    if new_key is None or len(new_key) != 12:
        return Outcome.UNRELATED
    end = t + _TCP_CHECKSUM + 2 if n >= t + _TCP_CHECKSUM + 2 else t + 4
    old_quote = bytes(buf[q:end])  # every word the rewrite changes is in here (and 16-bit aligned)
    _U16.pack_into(buf, q + 10, apply(q_csum, delta(old_key[:8], new_key[:8])))
    _ADDRS.pack_into(buf, q + 12, new_key[:8])
    _PORTS.pack_into(buf, t, new_key[8:])
    if end > t + 4:
        csum = _U16.unpack_from(buf, t + _TCP_CHECKSUM)[0]
        _U16.pack_into(buf, t + _TCP_CHECKSUM, apply(csum, delta(old_key, new_key)))
    icmp_csum = _U16.unpack_from(buf, ihl + 2)[0]
    _U16.pack_into(buf, ihl + 2, apply(icmp_csum, delta(old_quote, bytes(buf[q:end]))))
    new_outer = new_key[4:8] + new_key[:4]  # from the address the sender talked to, to the sender
    _U16.pack_into(buf, 10, apply(ip_csum, delta(outer, new_outer)))
    _ADDRS.pack_into(buf, 12, new_outer)
    return Outcome.TRANSLATED


def full_nat_lookup(forward: Mapping[bytes, Flow], reverse: Mapping[bytes, Flow]) -> Lookup:
    """Passthrough's mapping over the flow table's two dicts (``FlowTable.forward``, ``.reverse``).

    A packet the balancer sent towards a server (``LB:eport -> server:sport``) is the mirror of a return key:
    the client sent it as ``client:cport -> VIP:vport``, the flow's forward key. A packet it sent towards a
    client (``VIP:vport -> client:cport``) is the mirror of a forward key: the server sent it as
    ``server:sport -> LB:eport``, the flow's return key.
    """
    forward_get, reverse_get = forward.get, reverse.get

    def lookup(quoted: bytes) -> bytes | None:
        key = mirror(quoted)
        flow = reverse_get(key)
        if flow is not None:
            return flow.fwd_key
        flow = forward_get(key)
        return None if flow is None else flow.ret_key or None

    return lookup


def passthrough_translator(
    forward: Mapping[bytes, Flow], reverse: Mapping[bytes, Flow], counters: PassthroughCounters
) -> Callable[[bytearray], bytes | None]:
    """What passthrough does with a queued ICMP packet: translate it over the flow table, count the outcome
    (``icmp_translated``, ``icmp_unrelated``, ``icmp_malformed``: its one verdict counter) and accept it,
    translated or as it came (the kernel then treats it as it would without convey). The one exception is a
    cut copy (the queue copied less than the total length; ``ipv4.Malformed.TOO_LONG``): accepting it with
    these bytes would truncate the packet, so it is dropped (None)."""
    lookup = full_nat_lookup(forward, reverse)

    def on_icmp(buf: bytearray) -> bytes | None:
        outcome = translate(buf, lookup)
        if outcome == Outcome.TRANSLATED:
            counters.icmp_translated += 1
        elif outcome == Outcome.UNRELATED:
            counters.icmp_unrelated += 1
        else:
            counters.icmp_malformed += 1
            if len(buf) >= 4 and _U16.unpack_from(buf, 2)[0] > len(buf):
                return None
        return bytes(buf)

    return on_icmp
