"""Accepting clients on a frontend's listening socket, with a pause when this host runs out of descriptors.

Neither loop's own accept path is usable when descriptors run out: asyncio's selector loop pauses 1 s but reports each
pause to the loop's exception handler (an ERROR with a traceback), and uvloop (libuv) accepts every pending client
and closes it at once (libuv's "EMFILE trick"), so clients fail in a loop; when even that fails, uvloop closes the
listening handle without a word and the frontend never accepts again. So convey accepts itself: the listening socket
is watched with ``add_reader`` and drained in batches; EMFILE, ENFILE, ENOBUFS or ENOMEM stop the reading for
``MIN_PAUSE`` seconds, doubling up to ``MAX_PAUSE`` while the shortage lasts. Meanwhile clients wait in the kernel's
accept queue (they are not failed) and established connections, health checks and the stats service carry on. The
relay pauses the acceptor too when connecting to a server fails for a local reason (the descriptor the client took
was the last one). Pauses are logged at most once per ``LOG_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from convey.proxy.resources import LOCAL_ERRNOS

log = logging.getLogger("convey.proxy.accept")

__all__ = ["Acceptor"]

MIN_PAUSE = 0.1
MAX_PAUSE = 1.0
BACKOFF_RESET = 10.0  # seconds without a pause after which the next pause starts at MIN_PAUSE again
LOG_EVERY = 10.0
BATCH = 128  # accepts per readiness event, so one busy listener cannot starve the loop
# A client that went away before it was accepted, or a firewall's refusal: skip it and accept the next.
_CLIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


class Acceptor:
    """Accepts connections on ``sock`` (listening, non-blocking) and passes each to ``on_client(conn, addr)``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_client: Callable[[socket.socket, object], None],
        name: str,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._on_client = on_client
        self.name = name
        self.pauses = 0  # times accepting was paused for a local resource shortage
        self.errors = 0  # other accept errors (skipped)
        self._delay = MIN_PAUSE
        self._last_pause = -BACKOFF_RESET
        self._last_log = -LOG_EVERY
        self._unlogged = 0
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False
        self._stopped = False

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._ready)
        self._reading = True

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    @property
    def paused(self) -> bool:
        return self._timer is not None

    def pause(self, exc: OSError) -> None:
        """Stop accepting for a while: this host is out of ``exc``'s resource (no-op while already paused)."""
        if self._stopped or self._timer is not None:
            return
        now = self._loop.time()
        if now - self._last_pause > BACKOFF_RESET:
            self._delay = MIN_PAUSE
        delay = self._delay
        self._delay = min(MAX_PAUSE, delay * 2)
        self._last_pause = now
        self.pauses += 1
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        self._timer = self._loop.call_later(delay, self._resume)
        if now - self._last_log >= LOG_EVERY:
            log.warning(
                "frontend=%s event=accept_paused seconds=%g error=%r pauses_not_logged=%d",
                self.name,
                delay,
                errno.errorcode.get(exc.errno or 0, str(exc)),
                self._unlogged,
            )
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1

    def _resume(self) -> None:
        self._timer = None
        if not self._stopped and not self._reading:
            self._loop.add_reader(self._fd, self._ready)
            self._reading = True

    def _ready(self) -> None:
        sock = self._sock
        on_client = self._on_client
        for _ in range(BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    self.pause(exc)
                    return
                self.errors += 1
                if exc.errno in _CLIENT_ERRNOS:
                    continue
                log.error("frontend=%s event=accept_error error=%r", self.name, str(exc))
                self.pause(exc)  # an unexpected error: do not spin on it
                return
            on_client(conn, addr)
