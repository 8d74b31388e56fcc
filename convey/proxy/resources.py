"""Local resources: the open-file limit, errors that mean *this host* ran out of something, TCP keepalive.

A local resource error (no descriptor, no buffer memory, no free local port) says nothing about the server being
reached: health checks and the proxy's connect path must never hold it against that server. The engine raises
RLIMIT_NOFILE towards the hard limit at start (a proxied connection holds two descriptors, and the common soft
limit of 1024 is ~500 connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import struct

log = logging.getLogger("convey.resources")

__all__ = [
    "LINGER_RST",
    "LOCAL_ERRNOS",
    "is_local_error",
    "raise_nofile_limit",
    "reset_transport",
    "set_keepalive",
]

# Out of descriptors (process or system), kernel buffers or memory; EADDRNOTAVAIL on connect: no local port free.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})

# TCP keepalive with `tcp_keepalive = true`: first probe after 60 s of silence, then every 10 s, 6 unanswered
# probes close the connection (a dead peer is found within ~2 minutes; the kernel's default is 2 hours).
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6

# struct linger {int l_onoff; int l_linger;} = {1, 0}: close() sends RST.
LINGER_RST = struct.pack("ii", 1, 0)

# RLIM_INFINITY as the hard limit: go no higher than this (the kernel's fs.nr_open caps it anyway).
NOFILE_CAP = 1 << 20


def is_local_error(exc: BaseException) -> bool:
    """Whether ``exc`` says this host ran out of a resource (not that the peer failed)."""
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most NOFILE_CAP when unlimited) and log the figures.
    Returns the (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("event=nofile_limit_unchanged soft=%d hard=%d error=%r", soft, hard, str(exc))
        else:
            soft = target
    log.info("event=nofile_limit soft=%s hard=%s", _limit(soft), _limit(hard))
    return soft, hard


def _nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (fs.nr_open), at most NOFILE_CAP."""
    try:
        with open("/proc/sys/fs/nr_open") as file:
            return min(NOFILE_CAP, int(file.read()))
    except (OSError, ValueError):
        return NOFILE_CAP


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def set_keepalive(sock: socket.socket) -> None:
    """Turn on TCP keepalive with convey's timings (best effort: a socket already closed is left alone)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


def reset_transport(transport: asyncio.Transport) -> None:
    """Close a connection with RST (SO_LINGER 0), dropping anything unsent: its peer learns at once that nobody
    will answer, and no TIME_WAIT is left here."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    transport.abort()
