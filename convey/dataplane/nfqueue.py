"""The NFQUEUE binding: netfilterqueue's socket driven by the asyncio loop, plus a raw socket for resets.

The queue's file descriptor is registered with ``loop.add_reader``; when it is readable, ``run_socket`` hands
waiting packets to the callback, at most ``BATCH`` of them (see ``Batch``), and returns. So verdicts, health
checks, reload, flow expiry, signals and the stats snapshot all share one loop and one thread, and keep running
under a flood: with ``run(block=False)``, which returns only once the socket is empty, a sustained overload never
let the loop run again (measured: /stats timed out and health checks stopped for as long as the flood lasted).

netfilterqueue copies at most 4016 bytes of a packet (``MAX_COPY``). Packets are at most the MTU here (the kernel
segments GSO packets before queueing them, since the binding does not ask for GSO), and the packet core refuses to
rewrite a packet whose copy was cut (``too_long``).

Two bindings, chosen by ``[passthrough] queue_binding`` (``[dsr] queue_binding`` for DSR) through ``open_queue``:
``"netlink"``, the default (``nfq_socket.NetlinkQueue``: our own nfnetlink_queue socket with GSO-sized packets,
64 KB copies and one ``send`` per batch of verdicts), and ``"netfilterqueue"`` (this module's ``QueueBinding``).
Both hand the callback a packet with the same verdict methods and count the same ``Batch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from convey.errors import StartupError

log = logging.getLogger("convey.nfqueue")

MAX_COPY = 4016
# Packets the kernel holds for us. When the queue is full the kernel drops and counts in queue_dropped
# (--queue-bypass only applies while no program is bound to the queue).
QUEUE_MAXLEN = 8192
SOCK_RCVBUF = 8 * 1024 * 1024
# Packets handled per readable event at most (~2 ms at the measured ~4 us per packet); then the loop's other work.
BATCH = 512
PROC_QUEUES = Path("/proc/net/netfilter/nfnetlink_queue")


def _batch_done(size: int) -> bytes:
    raise BlockingIOError(errno.EAGAIN, "batch done")


class Batch:
    """The budget of one drain of the queue socket; ``NetfilterQueue.run_socket`` reads packets with ``recv``.

    While the batch lasts, ``recv`` is the socket's own (a C call: nothing of ours runs between packets). The
    callback counts ``left`` down and calls ``end`` at 0, which swaps in a ``recv`` that says EAGAIN: that ends
    ``run_socket``, the socket stays readable and the loop comes back to it after its other ready callbacks.
    The callback counts inline (measured: a Python ``recv`` wrapper that counted cost ~0.7 us per packet, ~20%).
    """

    __slots__ = ("_sock_recv", "left", "recv", "size")

    def __init__(self, size: int = 0) -> None:
        self.size = size or BATCH
        self.left = self.size
        self.recv: Callable[[int], bytes] = _batch_done
        self._sock_recv: Callable[[int], bytes] = _batch_done

    def bind(self, sock_recv: Callable[[int], bytes]) -> None:
        self._sock_recv = sock_recv

    def begin(self) -> None:
        self.left = self.size
        self.recv = self._sock_recv

    def end(self) -> None:
        self.recv = _batch_done


class QueueEdge(Protocol):
    """What a plane uses of a bound queue, whichever the binding."""

    queue_num: int
    _nfq: Any  # netfilterqueue's handle (or a stand-in with its ``get_fd()``); ``fileno()`` is the public way

    def start(self) -> None: ...

    def fileno(self) -> int: ...

    def stop(self) -> None: ...

    def counters(self) -> dict[str, int]: ...


def open_queue(
    binding: str, queue_num: int, callback: Callable[[Any], None], batch: Batch, verdicts_here: bool = True
) -> QueueEdge:
    """The queue edge ``binding`` names (``config.QUEUE_BINDINGS``), not started yet. ``verdicts_here`` False: the
    callback may leave a packet without a verdict because another thread gives it (the offload planes' verdict
    sender writes to the queue's socket, ``fileno()``); netfilterqueue never gives a verdict of its own anyway."""
    if binding == "netlink":
        from convey.dataplane.nfq_socket import NetlinkQueue

        return NetlinkQueue(queue_num, callback, batch, verdicts_here=verdicts_here)
    return QueueBinding(queue_num, callback, batch)


class QueueBinding:
    """One bound queue through netfilterqueue. ``callback(packet)`` must give every packet a verdict, never raise, and count ``batch``
    down itself (see ``Batch``)."""

    def __init__(self, queue_num: int, callback: Callable[[Any], None], batch: Batch) -> None:
        self.queue_num = queue_num
        self.callback = callback
        self.batch = batch
        self._nfq: Any = None
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self.read_errors = 0

    def start(self) -> None:
        try:
            from netfilterqueue import NetfilterQueue
        except ImportError:
            raise StartupError(
                "the netfilterqueue package is missing: pip install 'convey[packet]' "
                "(it needs the Debian package libnetfilter-queue-dev to build)"
            ) from None
        nfq = NetfilterQueue()
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf capped by net.core.rmem_max: fine
                nfq.bind(
                    self.queue_num, self.callback, max_len=QUEUE_MAXLEN, range=MAX_COPY, sock_len=SOCK_RCVBUF
                )
        except OSError as exc:
            raise StartupError(
                f"cannot bind NFQUEUE {self.queue_num}: {exc} (needs root / CAP_NET_ADMIN; is another process "
                f"bound to this queue? `cat {PROC_QUEUES}` shows who holds it)"
            ) from None
        self._nfq = nfq
        self._fd = nfq.get_fd()
        self._sock = socket.fromfd(self._fd, socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: closing it is ours
        self._sock.setblocking(False)
        self.batch.bind(self._sock.recv)
        asyncio.get_running_loop().add_reader(self._fd, self._drain)
        log.info("event=queue_bound queue=%d copy_range=%d maxlen=%d", self.queue_num, MAX_COPY, QUEUE_MAXLEN)

    def _drain(self) -> None:
        if self._nfq is None:
            return
        self.batch.begin()
        try:
            self._nfq.run_socket(self.batch)
        except OSError as exc:
            self.read_errors += 1
            if exc.errno not in (errno.EINTR, errno.EAGAIN):
                log.warning("event=queue_read_error queue=%d error=%r", self.queue_num, str(exc))

    def counters(self) -> dict[str, int]:
        return {}

    def fileno(self) -> int:
        return self._fd if self._fd is not None else -1

    def stop(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        if self._sock is not None:
            self.batch.bind(_batch_done)
            self._sock.close()
            self._sock = None
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
