"""Admission of a connection's first packet, shared by the per-packet (``passthrough``) and the offload
(``offload``) decisions, so the choice of frontend and server and the refusals are made in one place.

``admit`` answers the frontend, the server the scheduler chose and the client tuple's flow hash, or None after
counting why not (in the one vocabulary of ``convey.packet.counters``) and, where due, queueing a RST in
``rst_out``: ``not_vip`` (no RST), ``unknown_flow`` (not a SYN: a RST unless ``rst_unknown`` is off),
``table_full`` and ``no_server`` (the client is refused: a RST, and ``refused`` per frontend).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from convey.balancing.schedulers import flow_hash
from convey.packet.counters import PassthroughCounters
from convey.packet.ipv4 import ACK, FIN, RST, SYN, Parsed, addr_to_int, reset_for

__all__ = ["RST_QUEUE_LIMIT", "Admission", "Choice", "Chooser", "queue_reset"]

# (frontend name, flow hash) -> (server id, server addr, server port), or None when no server is healthy.
Choice = tuple[str, bytes, int]
Chooser = Callable[[str, int], Choice | None]

# At most this many resets wait in ``rst_out``: should the edge stop draining it, memory stays bounded.
RST_QUEUE_LIMIT = 256


def queue_reset(out: list[bytes], limit: int, p: Parsed) -> int:
    """Append the RST answering segment ``p`` to ``out``: 1 if queued, 0 if none is due (it was a RST), -1 if
    ``out`` already holds ``limit`` resets."""
    if p.flags & RST:
        return 0
    if len(out) >= limit:
        return -1
    rst = reset_for(p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags, p.payload_len)
    if rst is None:
        return 0
    out.append(rst)
    return 1


class Admission:
    """The first-packet checks; a decision class inherits it and sets these attributes in its ``__init__``."""

    vips: Mapping[tuple[bytes, int], str]
    choose: Chooser
    rst_unknown: bool
    rst_out: list[bytes]
    counters: PassthroughCounters
    refused: dict[str, int]  # frontend -> clients refused (no_server, table_full, no_port)

    def admit(self, p: Parsed, full: bool) -> tuple[str, Choice, int] | None:
        """(frontend, the scheduler's choice, flow hash) for a SYN that may open a connection, else None."""
        counters = self.counters
        frontend = self.vips.get((p.dst, p.dport))
        if frontend is None:
            counters.not_vip += 1
            return None
        if p.flags & (SYN | ACK | RST | FIN) != SYN:
            counters.unknown_flow += 1
            if self.rst_unknown:
                self._reset(p)
            return None
        if full:
            counters.table_full += 1
            self._refuse(frontend, p)
            return None
        hashed = flow_hash(addr_to_int(p.src), p.sport, addr_to_int(p.dst), p.dport)
        choice = self.choose(frontend, hashed)
        if choice is None:
            counters.no_server += 1
            self._refuse(frontend, p)
            return None
        return frontend, choice, hashed

    def _refuse(self, frontend: str, p: Parsed) -> None:
        """The client of ``frontend`` is turned away (the reason is counted): a RST, and ``refused``."""
        self.refused[frontend] = self.refused.get(frontend, 0) + 1
        self._reset(p)

    def _reset(self, p: Parsed) -> None:
        queued = queue_reset(self.rst_out, RST_QUEUE_LIMIT, p)
        if queued > 0:
            self.counters.rst_queued += 1
        elif queued < 0:
            self.counters.rst_overflow += 1
