"""convey's own NFQUEUE binding (``queue_binding = "netlink"``): nfnetlink_queue over an AF_NETLINK socket.

Against netfilterqueue (nfqueue.py) it asks the kernel for whole GSO packets (``NFQA_CFG_F_GSO``, a copy range of
64 KB), so a bulk transfer costs one verdict per super-packet (up to ~64 KB) instead of one per MTU-sized segment,
and frames larger than 4016 bytes (jumbo MTUs) are no longer cut; and it sends all verdicts of a batch in one
``sendmsg``, big payloads as their own pieces of it (scatter-gather: a 64 KB payload is not copied into the batch).
The socket is read from the asyncio loop (``add_reader``) into one preallocated buffer, at most ``Batch.size``
packets per readable event, like the netfilterqueue edge; the planes' callbacks get a ``NetlinkPacket`` with
netfilterqueue's verdict methods (``get_payload``, ``set_payload``, ``set_mark``, ``accept``, ``drop``), so they do
not know which binding runs.

Checksums: see nfq_packet.py (a GSO packet's checksum is left to the kernel's segmentation, a partial one of
any other packet is completed in ``accept``).

Packets accepted unchanged keep the kernel's offload. Debug overrides (environment, read at start):
``CONVEY_QUEUE_GSO=0`` binds without ``NFQA_CFG_F_GSO`` (the kernel segments GSO packets and completes checksums
before queueing; bench/queue_binding.py measures both); ``CONVEY_QUEUE_GSO_CSUM=full`` writes a full checksum into
GSO packets too (~100-250 us per 64 KB in CPython: only to check the kernel's behaviour above);
``CONVEY_QUEUE_PIECE_MIN=0`` copies every payload into the batch's buffer instead of a sendmsg piece of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from convey.dataplane import nfq_netlink as nl
from convey.dataplane.nfq_packet import BIG, NetlinkPacket, swapped
from convey.errors import StartupError
from convey.packet.checksum import ipv4_tcp_checksum

__all__ = ["NetlinkPacket", "NetlinkQueue"]

log = logging.getLogger("convey.nfqueue")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
COPY_RANGE = nl.NFQNL_MAX_COPY_RANGE  # 65531: the most the kernel copies of a packet
RECV_BUF = 128 * 1024  # one packet message: its payload (at most COPY_RANGE) plus the attributes
SOCK_RCVBUF = 32 * 1024 * 1024  # up to ~500 GSO packets waiting for us
SOCK_SNDBUF = 8 * 1024 * 1024  # a send may not exceed this (netlink_sendmsg)
CONFIG_TIMEOUT = 5.0
QUEUE_MAXLEN = 8192  # as the netfilterqueue binding
PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"

_U16 = struct.Struct("!H")
_U32 = nl.BE32
# The head of a packet message: nlmsghdr, nfgenmsg, the first attribute's header and its first 4 bytes (the kernel
# always puts NFQA_PACKET_HDR first: the packet id, big-endian, read here in host order and written back so).
_FIRST = struct.Struct("=IHHIIBBHHHI")
_MASK = nl.NLA_TYPE_MASK


class NetlinkQueue:
    """One bound queue over our own netlink socket; the interface of ``nfqueue.QueueBinding``."""

    def __init__(
        self,
        queue_num: int,
        callback: Callable[[Any], None],
        batch: Any,
        gso: bool | None = None,
        verdicts_here: bool = True,
    ) -> None:
        self.queue_num = queue_num
        # False (the offload planes): a packet the callback leaves without a verdict gets one from another thread;
        # True: it is dropped here and counted (``no_verdict``), so a plane's bug cannot leave it queued.
        self.verdicts_here = verdicts_here
        self.callback = callback
        self.batch = batch
        self.gso = os.environ.get("CONVEY_QUEUE_GSO", "1") != "0" if gso is None else gso
        if not verdicts_here:
            # The offload planes queue first packets only (GSO buys nothing) and send rewritten payloads themselves
            # (verdict_sender.py), without ``accept``'s checksum work: without NFQA_CFG_F_GSO the kernel completes
            # every partial checksum before queueing (``skb_checksum_help`` in nfqnl_build_packet_message).
            self.gso = False
        # Debug only (module doc): a full checksum for GSO packets too, though the kernel's segmentation redoes it.
        self.full_gso = os.environ.get("CONVEY_QUEUE_GSO_CSUM") == "full"
        # Debug only: payloads of at least this many bytes go to sendmsg as their own pieces (0: none does).
        self.big = int(os.environ.get("CONVEY_QUEUE_PIECE_MIN", BIG)) or 1 << 31
        # Called after each drain's verdicts went out (passthrough offload: read conntrack's events in the same
        # turn of the loop, rather than in one more wakeup of their own); it must not raise.
        self.after_drain: Callable[[], object] | None = None
        self.after_drain_errors = 0
        self.out = bytearray()  # verdicts not sent yet, after the last of ``pieces``
        self.pieces: list[bytes | bytearray] = []  # verdicts not sent yet: heads and big payloads, in order
        self.held = 0  # bytes in ``pieces``
        self.res_id = socket.htons(queue_num)  # nfgenmsg's queue number, network order, as the host reads it
        self.verdicts = {v: swapped(v) for v in (nl.NF_ACCEPT, nl.NF_DROP)}
        self.accept_raw = self.verdicts[nl.NF_ACCEPT]
        self.prefixes = {
            v: nl.verdict_head(queue_num, 0, v, None, None)[:-4] for v in (nl.NF_ACCEPT, nl.NF_DROP)
        }
        self.read_errors = 0
        self.verdict_errors = 0  # verdicts the kernel refused (an NLMSG_ERROR came back)
        self.send_errors = 0
        self.no_verdict = 0  # packets a callback returned from without a verdict (dropped here)
        self.full_checksums = 0  # CSUMNOTREADY packets, not GSO, given a full checksum
        self.kernel_checksums = (
            0  # GSO packets accepted with a new payload: the kernel's segmentation checksums
        )
        self.gso_packets = 0
        self.cut_packets = 0  # longer than the copy range (NFQA_CAP_LEN)
        # Reads of the socket when it became readable, and the packets they got: packets / drains is the mean
        # batch (near Batch.size: the handler is the limit; a few: it mostly waits for packets, waking often).
        self.drains = 0
        self.packets = 0
        self._sock: socket.socket | None = None
        self._nfq: _FdHandle | None = None  # what the netfilterqueue binding's ``_nfq`` offers: ``get_fd()``
        self._buf = bytearray(RECV_BUF)
        self._view = memoryview(self._buf)
        self._pkt = NetlinkPacket(self)
        self._seq = 0

    # -- binding ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCK_RCVBUF),
                                       (SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCK_SNDBUF)):  # fmt: skip
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                except OSError:  # no CAP_NET_ADMIN: whatever net.core.[rw]mem_max allows
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            with contextlib.suppress(
                OSError
            ):  # a full buffer drops packets (counted by the kernel), no error
                sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            sock.settimeout(CONFIG_TIMEOUT)
            self._sock = sock
            self._configure()
            sock.setblocking(False)
        except BaseException:
            self._sock = None
            sock.close()
            raise
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)
        self._nfq = _FdHandle(sock.fileno())
        log.info(
            "event=queue_bound queue=%d binding=netlink copy_range=%d gso=%s maxlen=%d",
            self.queue_num, COPY_RANGE, int(self.gso), QUEUE_MAXLEN,
        )  # fmt: skip

    def _configure(self) -> None:
        flags = nl.NFQA_CFG_F_GSO if self.gso else 0
        bind_seq, params_seq = self._seq + 1, self._seq + 2
        self._seq += 2
        self._request(nl.config_bind(self.queue_num, bind_seq), bind_seq, "bind")
        params = nl.config_params(
            self.queue_num, COPY_RANGE, QUEUE_MAXLEN, flags, nl.NFQA_CFG_F_GSO, params_seq
        )
        self._request(params, params_seq, "configure")

    def _request(self, message: bytes, seq: int, what: str) -> None:
        """Send a config message and wait for its ack; packets that arrive meanwhile are dropped (the queue is
        not ready for them: before the copy mode is set they come without payload)."""
        sock = self._sock
        assert sock is not None
        sock.send(message)
        while True:
            try:
                size = sock.recv_into(self._buf)
            except TimeoutError:
                raise StartupError(f"NFQUEUE {self.queue_num}: the kernel did not answer ({what})") from None
            for at, end, kind in nl.iter_messages(self._buf, size):
                if kind == nl.PACKET_TYPE:
                    found = nl.decode_packet(self._buf, at, end)
                    sock.send(self.prefixes[nl.NF_DROP] + _U32.pack(found.packet_id))
                elif kind == nl.NLMSG_ERROR:
                    error, answered = nl.decode_error(self._buf, at)
                    if answered != seq:
                        continue
                    if error:
                        raise self._bind_error(error, what)
                    return

    def _bind_error(self, error: int, what: str) -> StartupError:
        text = os.strerror(error)
        holder = queue_holder(self.queue_num)
        if (
            error in (errno.EBUSY, errno.EPERM) and holder is not None
        ):  # the kernel says EPERM for "not yours"
            return StartupError(
                f"cannot bind NFQUEUE {self.queue_num}: another process holds it (netlink port id {holder}, "
                f"usually its pid); `cat {PROC_QUEUES}` shows who holds which queue (second column: the port id)"
            )
        if error == errno.EPERM:
            return StartupError(f"cannot bind NFQUEUE {self.queue_num}: {text} (needs root / CAP_NET_ADMIN)")
        return StartupError(f"NFQUEUE {self.queue_num}: {what} failed: {text}")

    # -- packets ----------------------------------------------------------------------------------------------

    def _drain(self) -> None:  # ~55 lines: the per-packet loop, kept in one frame on purpose
        sock = self._sock
        if sock is None:
            return
        recv_into = sock.recv_into
        buf, view, pkt, callback, batch = self._buf, self._view, self._pkt, self.callback, self.batch
        read_first = _FIRST.unpack_from
        read_attr = nl.NLA_HDR.unpack_from
        read_u32 = _U32.unpack_from
        packet_type, packet_hdr, payload_kind = nl.PACKET_TYPE, nl.NFQA_PACKET_HDR, nl.NFQA_PAYLOAD
        info_kind, cap_kind, gso_flag = nl.NFQA_SKB_INFO, nl.NFQA_CAP_LEN, nl.NFQA_SKB_GSO
        batch.begin()
        got = 0
        try:
            for _ in range(batch.size):
                try:
                    size = recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # ENOBUFS without NETLINK_NO_ENOBUFS: packets were lost, go on
                    self.read_errors += 1
                    if exc.errno != errno.ENOBUFS:
                        log.warning("event=queue_read_error queue=%d error=%r", self.queue_num, str(exc))
                        break
                    continue
                if size < 32:
                    self._other(size)
                    continue
                length, kind, _, _, _, _, _, _, _, first, raw = read_first(buf, 0)
                if kind != packet_type or length != size or first & _MASK != packet_hdr:
                    self._other(size)
                    continue
                # The attributes after NFQA_PACKET_HDR; the kernel writes NFQA_PAYLOAD last.
                at, info, payload_at, payload_len = 32, 0, 0, 0
                while at + 4 <= size:
                    attr_len, attr = read_attr(buf, at)
                    if attr_len < 4 or at + attr_len > size:
                        break
                    attr &= _MASK
                    if attr == payload_kind:
                        payload_at, payload_len = at + 4, attr_len - 4
                        break
                    if attr == info_kind:
                        info = read_u32(buf, at + 4)[0]
                    elif attr == cap_kind:
                        self.cut_packets += 1
                    at += (attr_len + 3) & ~3
                pkt._raw = raw
                pkt.payload = view[payload_at : payload_at + payload_len].tobytes()
                pkt.skb_info = info
                pkt._mark = pkt._new = None
                pkt.done = False
                if info & gso_flag:
                    self.gso_packets += 1
                got += 1
                callback(pkt)
                if not pkt.done:
                    if self.verdicts_here:
                        self.no_verdict += 1
                        pkt.drop()
                    else:
                        pkt.done = True  # its verdict is another thread's
                if batch.left <= 0:
                    break
        finally:
            self.flush()
            self.drains += 1
            self.packets += got
        if self.after_drain is not None:
            try:
                self.after_drain()
            except Exception:  # its own reader reports it again; the queue goes on
                self.after_drain_errors += 1

    def full_checksum(self, out: bytearray, at: int, packet: bytes | bytearray) -> None:
        """Write the full TCP checksum of ``packet`` (IPv4, TCP) into its copy at ``out[at:]``; not for a fragment
        or a packet whose headers do not fit."""
        thl = (packet[0] & 0x0F) << 2
        if len(packet) >= thl + 20 and not _U16.unpack_from(packet, 6)[0] & 0x3FFF:
            _U16.pack_into(out, at + thl + 16, ipv4_tcp_checksum(packet))
            self.full_checksums += 1

    def _other(self, size: int) -> None:
        """Anything but a single packet message: errors for refused verdicts, or several messages at once."""
        for at, end, kind in nl.iter_messages(self._buf, size):
            if kind == nl.NLMSG_ERROR:
                error, _ = nl.decode_error(self._buf, at)
                if error:
                    self.verdict_errors += 1
                    if self.verdict_errors <= 10 or self.verdict_errors % 1000 == 0:
                        log.warning("event=verdict_refused queue=%d error=%r count=%d", self.queue_num,
                                    os.strerror(error), self.verdict_errors)  # fmt: skip
            elif kind == nl.PACKET_TYPE:  # not expected (the kernel sends one per datagram): drop it
                found = nl.decode_packet(self._buf, at, end)
                self.out += self.prefixes[nl.NF_DROP] + _U32.pack(found.packet_id)
                self.no_verdict += 1

    def flush(self) -> None:
        """Send the verdicts gathered so far, in one ``sendmsg`` (big payloads as their own pieces)."""
        out, pieces = self.out, self.pieces
        if not (out or pieces) or self._sock is None:
            return
        try:
            if pieces:
                if out:
                    pieces.append(out)
                self._sock.sendmsg(pieces)
            else:
                self._sock.send(out)
        except OSError as exc:  # the packets stay queued until the queue goes; say so loudly
            self.send_errors += 1
            log.error("event=verdict_send_failed queue=%d bytes=%d error=%r", self.queue_num,
                      len(out) + self.held, str(exc))  # fmt: skip
        out.clear()
        pieces.clear()
        self.held = 0

    def fileno(self) -> int:
        """The netlink socket (verdict messages may be sent on it directly)."""
        return self._sock.fileno() if self._sock is not None else -1

    def counters(self) -> dict[str, int]:
        return {
            "verdict_errors": self.verdict_errors,
            "verdict_send_errors": self.send_errors,
            "no_verdict": self.no_verdict,
            "gso_packets": self.gso_packets,
            "full_checksums": self.full_checksums,
            "kernel_checksums": self.kernel_checksums,
            "cut_packets": self.cut_packets,
            "drains": self.drains,
            "packets": self.packets,
        }

    def stop(self) -> None:
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(RuntimeError, ValueError):  # the loop is already closed
            asyncio.get_running_loop().remove_reader(sock.fileno())
        self.flush()
        with contextlib.suppress(OSError):
            self._seq += 1
            sock.send(nl.config_unbind(self.queue_num, self._seq))
        self._sock = self._nfq = None
        sock.close()  # the kernel also unbinds a queue whose socket goes
        log.info("event=queue_unbound queue=%d binding=netlink", self.queue_num)


def queue_holder(queue_num: int, path: str = PROC_QUEUES) -> int | None:
    """The netlink port id bound to ``queue_num`` (/proc/net/netfilter/nfnetlink_queue), None when unbound."""
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[0] == str(queue_num):
                    return int(fields[1])
    except (OSError, ValueError):
        pass
    return None


class _FdHandle:
    """Stands in for netfilterqueue's handle where a plane asks the binding for its socket (``_nfq.get_fd()``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def get_fd(self) -> int:
        return self._fd
