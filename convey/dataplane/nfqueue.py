"""The NFQUEUE binding: netfilterqueue's socket driven by the asyncio loop, plus a raw socket for resets.

The queue's file descriptor is registered with ``loop.add_reader``; when it is readable, ``run_socket`` hands
waiting packets to the callback, at most ``BATCH`` of them, and returns. So verdicts, health checks, reload, flow
expiry, signals and the stats snapshot all share one loop and one thread, and keep running under a flood: with
``run(block=False)``, which returns only once the socket is empty, a sustained overload never let the loop run
again (measured: /stats timed out and health checks stopped for as long as the flood lasted).

netfilterqueue copies at most 4016 bytes of a packet (``MAX_COPY``). Packets are at most the MTU here (the kernel
segments GSO packets before queueing them, since the binding does not ask for GSO), and the packet core refuses to
rewrite a packet whose copy was cut (``too_long``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("convey.nfqueue")

MAX_COPY = 4016
# Packets the kernel holds for us. When the queue is full the kernel drops and counts in queue_dropped
# (--queue-bypass only applies while no program is bound to the queue).
QUEUE_MAXLEN = 8192
SOCK_RCVBUF = 8 * 1024 * 1024
# Packets handled per readable event at most (~2 ms at the measured ~4 us per packet); then the loop's other work.
BATCH = 512
PROC_QUEUES = Path("/proc/net/netfilter/nfnetlink_queue")


class _BatchReader:
    """The queue's socket as ``NetfilterQueue.run_socket`` reads it, cut off after ``left`` packets: it then says
    EAGAIN, which ends ``run_socket``; the socket stays readable and the loop comes back to it."""

    __slots__ = ("_recv", "left")

    def __init__(self, sock: socket.socket) -> None:
        self._recv = sock.recv
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        data: bytes = self._recv(size)
        return data


class QueueBinding:
    """One bound queue. ``callback(packet)`` must give every packet a verdict and never raise."""

    def __init__(self, queue_num: int, callback: Callable[[Any], None]) -> None:
        self.queue_num = queue_num
        self.callback = callback
        self._nfq: Any = None
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._reader: _BatchReader | None = None
        self.read_errors = 0

    def start(self) -> None:
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError as exc:
            raise RuntimeError(
                "the netfilterqueue package is missing: pip install 'convey[packet]' "
                "(it needs the Debian package libnetfilter-queue-dev to build)"
            ) from exc
        nfq = NetfilterQueue()
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf capped by net.core.rmem_max: fine
                nfq.bind(
                    self.queue_num, self.callback, max_len=QUEUE_MAXLEN, range=MAX_COPY, sock_len=SOCK_RCVBUF
                )
        except OSError as exc:
            raise RuntimeError(
                f"cannot bind NFQUEUE {self.queue_num}: {exc} (needs root / CAP_NET_ADMIN; is another convey "
                "bound to this queue?)"
            ) from None
        self._nfq = nfq
        self._fd = nfq.get_fd()
        self._sock = socket.fromfd(self._fd, socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: closing it is ours
        self._sock.setblocking(False)
        self._reader = _BatchReader(self._sock)
        asyncio.get_running_loop().add_reader(self._fd, self._drain)
        log.info("event=queue_bound queue=%d copy_range=%d maxlen=%d", self.queue_num, MAX_COPY, QUEUE_MAXLEN)

    def _drain(self) -> None:
        reader = self._reader
        if reader is None:
            return
        reader.left = BATCH
        try:
            self._nfq.run_socket(reader)
        except OSError as exc:
            self.read_errors += 1
            if exc.errno not in (errno.EINTR, errno.EAGAIN):
                log.warning("event=queue_read_error queue=%d error=%r", self.queue_num, str(exc))

    def stop(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._reader = None
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
            log.info("event=queue_unbound queue=%d", self.queue_num)


def queue_counters(queue_num: int, path: Path = PROC_QUEUES) -> dict[str, int]:
    """The kernel's counters for a queue: packets waiting, dropped by the kernel (queue full) and by the netlink
    socket (our receive buffer full). Empty when the queue is not bound."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 7 and fields[0].isdigit() and int(fields[0]) == queue_num:
            return {
                "queue_waiting": int(fields[2]),
                "queue_dropped": int(fields[5]),
                "queue_user_dropped": int(fields[6]),
            }
    return {}


class RawSender:
    """Sends complete IPv4 packets (our TCP resets) with a raw socket; the kernel routes them."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._sock.setblocking(False)
        self.sent = 0
        self.failed = 0

    def send(self, packet: bytes) -> None:
        dst = socket.inet_ntoa(packet[16:20])
        try:
            self._sock.sendto(packet, (dst, 0))
            self.sent += 1
        except OSError:
            self.failed += 1

    def close(self) -> None:
        self._sock.close()
