"""The verdicts of convey's own NFQUEUE binding (nfq_socket.py): ``NetlinkPacket``, what a plane's callback gets.

It has netfilterqueue's verdict methods (``get_payload``, ``set_payload``, ``set_mark``, ``accept``, ``drop``) and
writes each verdict into the queue's batch (``NetlinkQueue.out``, and ``pieces`` for big payloads: a 64 KB payload
goes to ``sendmsg`` as its own piece instead of being copied into the batch). A verdict's head is one ``struct``
call; the packet id and verdict are kept in the byte order the kernel wants, read and written unchanged.

Checksums of a packet accepted with a new payload (Linux 6.x source):

- ``nfqnl_mangle`` (net/netfilter/nfnetlink_queue.c) copies the payload in and sets ``skb->ip_summed =
  CHECKSUM_NONE``: whatever offload state the packet had is gone, the bytes we send are taken as they are.
- a GSO packet (``NFQA_SKB_GSO``) is then segmented in software on the way out: ``netif_needs_gso``
  (include/linux/netdevice.h, net/core/dev.h since 6.3; called from ``validate_xmit_skb`` in net/core/dev.c) is
  true for a GSO skb whose ``ip_summed`` is neither CHECKSUM_PARTIAL nor CHECKSUM_UNNECESSARY, and
  ``tcp4_gso_segment`` (net/ipv4/tcp_offload.c), for ``ip_summed != CHECKSUM_PARTIAL``, sets ``th->check = 0``,
  marks the skb CHECKSUM_PARTIAL and writes the pseudo-header sum itself (``__tcp_v4_send_check``); every segment's
  checksum is then computed from scratch (``tcp_gso_segment``: ``gso_make_checksum`` or the device's offload). So
  the checksum field of a GSO packet we accept is never used, whatever it holds: convey only forwards, every
  such packet is transmitted, so it is segmented, and convey writes no checksum for it (counted in
  ``kernel_checksums``).
- a packet that is not GSO but whose checksum the kernel had not completed (``NFQA_SKB_CSUMNOTREADY``,
  CHECKSUM_PARTIAL: the field holds the pseudo-header sum only) is sent as it is after CHECKSUM_NONE, so ``accept``
  writes a full TCP checksum into it (``checksum.ipv4_tcp_checksum``; at most an MTU, cheap; ``full_checksums``).
- every other packet had a complete checksum, and the packet core's incremental update (fastpath.py) keeps it right.
  Without ``NFQA_CFG_F_GSO`` no packet comes partial: ``nfqnl_build_packet_message`` completes the checksum first
  (``nf_queue_checksum_help`` when ``ip_summed == CHECKSUM_PARTIAL``), and segments GSO packets before queueing.
"""

from __future__ import annotations

import struct
import sys
from typing import TYPE_CHECKING

from convey.dataplane import nfq_netlink as nl

if TYPE_CHECKING:
    from convey.dataplane.nfq_socket import NetlinkQueue

__all__ = ["BIG", "FLUSH_AT", "NetlinkPacket", "swapped"]

FLUSH_AT = 1024 * 1024  # send the verdicts gathered so far once they reach this many bytes
BIG = 1024  # a payload this long goes to sendmsg as its own piece (not copied into the batch's buffer)
MAX_PIECES = 512  # pieces of one sendmsg (the kernel takes at most UIO_MAXIOV, 1024)

_U32 = nl.BE32
_NATIVE_U32 = struct.Struct("=I")
# A verdict with a payload, up to the payload: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR (verdict and id in network
# order, given here in host order already swapped), the NFQA_PAYLOAD header. With a mark: NFQA_MARK before it.
_WITH_PAYLOAD = struct.Struct("=IHHIIBBHHHIIHH")
_WITH_MARK = struct.Struct("=IHHIIBBHHHIIHH4s")
_VERDICT_TYPE, _REQUEST, _VERDICT_HDR, _PAYLOAD = (
    nl.VERDICT_TYPE,
    nl.NLM_F_REQUEST,
    nl.NFQA_VERDICT_HDR,
    nl.NFQA_PAYLOAD,
)
_PADS = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")


def swapped(value: int) -> int:
    """A 32-bit value in network order as the host reads it (``=I`` of its big-endian bytes)."""
    return int.from_bytes(value.to_bytes(4, "big"), sys.byteorder)


class NetlinkPacket:
    """The packet a plane's callback gets: netfilterqueue's verdict methods over the binding's verdict buffer.

    One object per binding, refilled for every packet (the callbacks give their verdict before they return).
    ``_raw`` is the packet id as read from the message in host order (written back unchanged); ``id`` is it."""

    __slots__ = ("_mark", "_new", "_queue", "_raw", "done", "payload", "skb_info")

    def __init__(self, queue: NetlinkQueue) -> None:
        self._queue = queue
        self._raw = 0
        self.payload = b""
        self.skb_info = 0
        self._mark: int | None = None
        self._new: bytes | bytearray | None = None
        self.done = True

    @property
    def id(self) -> int:
        return swapped(self._raw)

    @id.setter
    def id(self, packet_id: int) -> None:
        self._raw = swapped(packet_id)

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes | bytearray) -> None:
        self._new = payload

    def set_mark(self, mark: int) -> None:
        self._mark = mark

    def accept(self) -> None:
        new = self._new
        queue = self._queue
        if new is None or self._mark is not None or self.skb_info or self.done or len(new) >= queue.big:
            self._verdict(nl.NF_ACCEPT)
            return
        # The common small packet: a new payload, no mark, a complete checksum (what ``_verdict`` does for it).
        self.done = True
        out = queue.out
        size = len(new)
        pad = -size & 3
        out += _WITH_PAYLOAD.pack(36 + size + pad, _VERDICT_TYPE, _REQUEST, 0, 0, 0, 0, queue.res_id, 12,
                                  _VERDICT_HDR, queue.accept_raw, self._raw, 4 + size, _PAYLOAD)  # fmt: skip
        out += new
        if pad:
            out += _PADS[pad]
        if len(out) >= FLUSH_AT:
            queue.flush()

    def drop(self) -> None:
        self._verdict(nl.NF_DROP)

    def _verdict(
        self, verdict: int
    ) -> None:  # ~45 lines: every verdict goes through here, one frame on purpose
        if self.done:
            raise RuntimeError("this packet already has a verdict")
        self.done = True
        queue = self._queue
        out = queue.out
        new, mark = self._new, self._mark
        if new is None or verdict == nl.NF_DROP:
            if mark is None:
                out += queue.prefixes[verdict]
                out += _NATIVE_U32.pack(self._raw)
            else:
                out += nl.verdict_head(queue.queue_num, self.id, verdict, mark, None)
        else:
            size = len(new)
            pad = -size & 3
            if mark is None:
                out += _WITH_PAYLOAD.pack(36 + size + pad, nl.VERDICT_TYPE, nl.NLM_F_REQUEST, 0, 0, 0, 0,
                                          queue.res_id, 12, nl.NFQA_VERDICT_HDR, queue.verdicts[verdict],
                                          self._raw, 4 + size, nl.NFQA_PAYLOAD)  # fmt: skip
            else:
                out += _WITH_MARK.pack(44 + size + pad, nl.VERDICT_TYPE, nl.NLM_F_REQUEST, 0, 0, 0, 0,
                                       queue.res_id, 12, nl.NFQA_VERDICT_HDR, queue.verdicts[verdict],
                                       self._raw, 8, nl.NFQA_MARK, _U32.pack(mark))  # fmt: skip
                out += nl.NLA_HDR.pack(4 + size, nl.NFQA_PAYLOAD)
            # The kernel takes the payload as it is (nfqnl_mangle: CHECKSUM_NONE). A GSO packet is segmented in
            # software and tcp4_gso_segment sets every segment's checksum up; a partial checksum (CSUMNOTREADY) of
            # any other packet must be completed here; the rest were complete. The module doc has the details.
            info = self.skb_info
            full = (
                info & nl.NFQA_SKB_CSUMNOTREADY
                and (not info & nl.NFQA_SKB_GSO or queue.full_gso)
                and size >= 40
                and new[9] == 6
            )
            if info & nl.NFQA_SKB_GSO and not full:
                queue.kernel_checksums += 1  # the kernel's segmentation writes every segment's checksum
            if size < queue.big:
                at = len(out)
                out += new
                if full:
                    queue.full_checksum(out, at, new)
            else:  # its own piece of the sendmsg: no copy into ``out``
                if full:
                    new = bytearray(new)
                    queue.full_checksum(new, 0, new)
                queue.pieces.append(bytes(out))
                queue.pieces.append(new)
                queue.held += len(out) + size
                out.clear()
            if pad:
                out += _PADS[pad]
        if len(out) + queue.held >= FLUSH_AT or len(queue.pieces) >= MAX_PIECES:
            queue.flush()
