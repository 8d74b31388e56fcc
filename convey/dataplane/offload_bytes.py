"""Passthrough offload's bytes: the kernel's counter totals in, payload bytes not reported yet out (sans-I/O).

The kernel counts every packet of a connection convey marked into an nftables set keyed by (connmark, VIP
address, VIP port) and direction (``rules.byte_counters``): packets and IP bytes, since the table was made.
``ByteTally`` turns successive readings of those totals into payload bytes per key, in the original convey's
directions (``tx`` client -> server, ``rx`` server -> client):

- the first reading (``start``) is the baseline: what was counted before this process started is not its own;
- a total smaller than the last one means the table was made again (a rules re-install): counting goes on
  from zero, nothing is lost or counted twice;
- payload = IP bytes - packets x a data packet's headers - connections x what a first packet (SYN, SYN-ACK)
  carries more, with ``HeaderSizes`` from the SYNs as the per-connection accounting did, and ``opened``
  connections per key (``opened``, from convey's decisions). A result never goes down: a SYN decided before a
  reading whose SYN-ACK comes after it is made up at the next one.

Only keys whose worker bits are this process's (``worker_mask``/``worker_bits``) are its own: in a worker
process every worker reads the same set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from convey.dataplane.conntrack_records import HeaderSizes
from convey.dataplane.rules.byte_counters import CounterKey, Totals

__all__ = ["ByteTally"]


@dataclass(slots=True)
class _Seen:
    last: Totals = field(default_factory=Totals)  # the kernel's totals at the last reading
    since_start: Totals = field(default_factory=Totals)  # what this process counted
    reported: tuple[int, int] = (0, 0)  # payload (tx, rx) reported so far


def _grown(now: Totals, last: Totals) -> Totals:
    if now.packets_orig < last.packets_orig or now.packets_reply < last.packets_reply:
        last = Totals()  # made again: counted from zero
    return Totals(
        now.packets_orig - last.packets_orig,
        now.bytes_orig - last.bytes_orig,
        now.packets_reply - last.packets_reply,
        now.bytes_reply - last.bytes_reply,
    )


def _payload(packets: int, ip_bytes: int, connections: int, sizes: HeaderSizes) -> int:
    if packets <= 0:
        return 0
    firsts = min(connections, packets)
    return max(0, ip_bytes - packets * sizes.data - firsts * (sizes.first - sizes.data))


@dataclass(slots=True)
class ByteTally:
    """Kernel totals -> payload deltas per key; see the module doc."""

    worker_mask: int = 0
    worker_bits: int = 0
    sizes: HeaderSizes = field(default_factory=HeaderSizes)
    opened: dict[CounterKey, int] = field(default_factory=dict)  # connections decided per key since start
    readings: int = 0
    _seen: dict[CounterKey, _Seen] = field(default_factory=dict)
    _started: bool = False

    def _ours(self, key: CounterKey) -> bool:
        return key[0] & self.worker_mask == self.worker_bits

    def decided(self, key: CounterKey) -> None:
        """convey marked a connection's first packet with this key."""
        self.opened[key] = self.opened.get(key, 0) + 1

    def start(self, totals: Mapping[CounterKey, Totals]) -> None:
        """The baseline: the totals when this process starts."""
        for key, now in totals.items():
            if self._ours(key):
                self._seen[key] = _Seen(last=now)
        self._started = True

    def update(self, totals: Mapping[CounterKey, Totals]) -> list[tuple[CounterKey, int, int]]:
        """A new reading: (key, tx, rx) payload bytes not reported before, for each key that has some."""
        if not self._started:
            self.start(totals)
            return []
        self.readings += 1
        out: list[tuple[CounterKey, int, int]] = []
        for key, now in totals.items():
            if not self._ours(key):
                continue
            seen = self._seen.get(key)
            if seen is None:
                seen = self._seen[key] = _Seen()
            grown = _grown(now, seen.last)
            seen.last = now
            acc = seen.since_start
            acc.packets_orig += grown.packets_orig
            acc.bytes_orig += grown.bytes_orig
            acc.packets_reply += grown.packets_reply
            acc.bytes_reply += grown.bytes_reply
            conns = self.opened.get(key, 0)
            tx = _payload(acc.packets_orig, acc.bytes_orig, conns, self.sizes)
            rx = _payload(acc.packets_reply, acc.bytes_reply, conns, self.sizes)
            old_tx, old_rx = seen.reported
            seen.reported = (max(tx, old_tx), max(rx, old_rx))
            d_tx, d_rx = max(0, tx - old_tx), max(0, rx - old_rx)
            if d_tx or d_rx:
                out.append((key, d_tx, d_rx))
        return out
