"""What the packet decisions count: one vocabulary for passthrough and DSR, whichever path decided.

Every packet given to a decision lands in exactly one verdict counter: passthrough ``ingress_accepted``,
``ingress_dropped`` (client -> VIP), ``return_accepted``, ``return_dropped`` (server -> balancer); DSR, which
sees one direction only, ``accepted`` and ``dropped``; passthrough's ICMP errors (``convey.packet.icmp``) land
in ``icmp_translated``, ``icmp_unrelated`` or ``icmp_malformed`` instead (accepted, translated or as they came;
a cut copy is dropped). Every dropped packet also lands in exactly one reason
counter (``DROP_REASONS``), and a reason has the same name in both modes:

- ``malformed``, ``fragment``, ``too_long``: ``ipv4.parse`` said ``Malformed`` (fragments and cut copies have
  counters of their own; the kinds are counted too, in the decision's ``parse_errors``);
- ``not_vip``: a client packet to no frontend; ``no_server``: no healthy server (the client gets a RST);
- ``errors``: an unexpected exception (a bug) while deciding; the packet is dropped;
- passthrough only: ``unknown_flow`` (a client packet of no flow, not a SYN), ``unknown_return`` (a return
  packet for an LB addr:eport nobody uses), ``wrong_server`` (used, but by a flow with another server),
  ``table_full``, ``no_port`` (the client is refused with a RST), ``rst_out_of_window`` (a RST of a known flow
  outside the receiver's window: ``convey.packet.seqcheck``; the endpoint would ignore it);
- DSR only: ``no_mark`` (``rewrite = "mac"``: the chosen server has no fwmark).

The other counters are not verdicts: ``bytes_tx`` (TCP payload client -> server), ``bytes_rx`` (back; DSR
never sees it), ``rewrites`` (accepted packets that were rewritten), ``ip_options`` (accepted packets
carrying IP options), DSR's ``rescheduled`` (packets of unknown flows scheduled by the flow hash) and
``unpinned`` (flows forwarded without a table entry because the table was full); events that are not packets:
``flows_opened``, ``flows_closed``, ``rst_queued``, ``rst_overflow`` and ``callback_errors`` (an
``on_flow_open`` or ``on_flow_close`` callback raised).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from convey.packet.ipv4 import Malformed

__all__ = ["DsrCounters", "PassthroughCounters", "count_malformed"]

# Reasons both modes share; each class lists all of its own in DROP_REASONS.
_SHARED_REASONS = ("malformed", "fragment", "too_long", "not_vip", "no_server", "errors")


@dataclass(slots=True)
class PassthroughCounters:
    """Passthrough counters (module doc). ``rewrites`` is derived: every accepted packet is rewritten."""

    DROP_REASONS: ClassVar[tuple[str, ...]] = (
        *_SHARED_REASONS,
        "unknown_flow",
        "unknown_return",
        "wrong_server",
        "table_full",
        "no_port",
        "rst_out_of_window",
    )

    ingress_accepted: int = 0
    ingress_dropped: int = 0
    return_accepted: int = 0
    return_dropped: int = 0
    bytes_tx: int = 0
    bytes_rx: int = 0
    ip_options: int = 0
    malformed: int = 0
    fragment: int = 0
    too_long: int = 0
    not_vip: int = 0
    unknown_flow: int = 0
    unknown_return: int = 0
    wrong_server: int = 0
    no_server: int = 0
    table_full: int = 0
    no_port: int = 0
    rst_out_of_window: int = 0
    errors: int = 0
    flows_opened: int = 0
    flows_closed: int = 0
    rst_queued: int = 0
    rst_overflow: int = 0
    callback_errors: int = 0
    # ICMP errors (convey.packet.icmp): verdicts of their own, every one accepted (a cut copy dropped)
    icmp_translated: int = 0
    icmp_unrelated: int = 0
    icmp_malformed: int = 0

    @property
    def rewrites(self) -> int:
        return self.ingress_accepted + self.return_accepted

    def as_dict(self) -> dict[str, int]:
        result = asdict(self)
        result["rewrites"] = self.rewrites
        return result


@dataclass(slots=True)
class DsrCounters:
    """DSR counters (see the module doc); ``rewrites`` counts the accepted packets of the ``ip`` flavour."""

    DROP_REASONS: ClassVar[tuple[str, ...]] = (*_SHARED_REASONS, "no_mark")

    accepted: int = 0
    dropped: int = 0
    bytes_tx: int = 0
    rewrites: int = 0
    ip_options: int = 0
    malformed: int = 0
    fragment: int = 0
    too_long: int = 0
    not_vip: int = 0
    no_server: int = 0
    no_mark: int = 0
    errors: int = 0
    rescheduled: int = 0
    unpinned: int = 0
    flows_opened: int = 0
    flows_closed: int = 0
    rst_queued: int = 0
    rst_overflow: int = 0
    callback_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_malformed(
    counters: PassthroughCounters | DsrCounters, kinds: dict[Malformed, int], kind: Malformed
) -> None:
    """Count a packet ``parse`` rejected: its kind, and its one reason counter. The caller counts the drop."""
    kinds[kind] += 1
    if kind == Malformed.FRAGMENT:
        counters.fragment += 1
    elif kind == Malformed.TOO_LONG:
        counters.too_long += 1
    else:
        counters.malformed += 1
