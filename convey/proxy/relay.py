"""Proxy mode's data plane: a TCP relay built on asyncio Protocols (no streams, no per-chunk tasks).

A frontend (:mod:`convey.proxy.frontend`) accepts clients; each gets a :class:`Client` protocol. Once a
server has accepted, an ``_Upstream`` protocol is linked to it and bytes are passed between the two transports as they
arrive (``transport.write`` of the very ``bytes`` object received, so a chunk is copied only when the kernel cannot
take it at once).

Per connection:

* accepted: ``opened`` on (total, frontend, backend). Until a server is connected, early client bytes wait in the
  kernel (asyncio's loop: reading is paused) or, with uvloop, which starts reading after ``connection_made`` whatever
  the protocol asked, are held here up to ``EARLY_LIMIT`` bytes before reading pauses; either way they are delivered,
  in order, once connected. The same holds for a server that speaks first.
* ``pools[config.backend].candidates(...)`` gives up to ``max_attempts`` servers; none -> ``refused`` is counted and
  the client is reset (RST: SO_LINGER 0 then abort, so it learns at once that nobody will answer, and no TIME_WAIT is
  left here). Each candidate gets ``connect_timeout`` seconds; a failure counts ``failed`` on that server's scope and
  the next one is tried. When all fail, ``failed`` is counted on (total, frontend, backend) and the client is reset.
  A local resource error (no descriptor, buffer or local port: :mod:`convey.proxy.resources`) is not the
  server's failure: the frontend pauses accepting and the attempt is repeated every ``LOCAL_RETRY`` seconds
  for up to ``connect_timeout``; then the client is reset and counted as ``refused``.
* connected: ``pool.acquire(server)``, ``opened`` on the server's scope, then relay. Half-close is passed on: an EOF
  from one side becomes ``write_eof()`` towards the other, which may keep sending; both transports are closed once
  both directions have ended, or as soon as either side's connection is lost (the other side still gets what was
  already buffered for it: ``close()`` flushes). Never ``write_eof()`` a transport that has itself received EOF:
  uvloop 0.23.0 then aborts the process under load (``double free or corruption``, seen while writing
  bench/lib/roles.py's floor relay); closing both when the second side ends is what avoids it.
* flow control: when one transport's write buffer passes its high-water mark the other side stops reading until it
  drains, so a slow peer never makes the proxy buffer more than about one high-water mark per direction.
* idle: each protocol stores ``_idle = 0`` per chunk received (and per drain, EOF); the frontend's sweep closes
  connections quiet for ``idle_timeout`` (see :mod:`convey.proxy.frontend`).
* exactly once, when both transports are gone: ``closed`` on every scope opened and ``pool.release(server)``.

TCP_NODELAY: both asyncio's selector loop and uvloop set it on every TCP transport they create, accepted and
connected ones alike (tests check it), so it is not set again here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from convey.balancing.pool import Pool, Server
from convey.logs import CONNECTIONS, ConnectionRecord, LogLimiter
from convey.proxy.resources import LINGER_RST as _LINGER_RST  # noqa: F401 (tests use relay._LINGER_RST)
from convey.proxy.resources import is_local_error, set_keepalive
from convey.proxy.resources import reset_transport as _reset
from convey.stats import Counters, failed, opened, refused

if TYPE_CHECKING:
    from convey.proxy.frontend import ProxyFrontend

log = logging.getLogger(__name__)
# Refusals and failed connects: WARNING, at most one line per frontend/server and reason per 10 s (``suppressed=N``).
limited = LogLimiter(log, 10.0)

__all__ = ["Client"]

# Schedulers known to ignore the flow hash: skip computing it for them (the peer address lookup and two splitmix
# rounds are a measurable part of a short connection's cost).
_HASH_FREE_SCHEDULERS = frozenset({"wrr", "least_conn"})

# Write buffer limits of both transports of a connection (bytes). The high mark bounds what the proxy holds per
# direction for a slow reader; larger marks mean fewer pause/resume round trips on bulk transfers.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# Bytes one side may send before its connection is linked to the other (uvloop reads at once) before reading pauses.
EARLY_LIMIT = 64 * 1024


def _hold_early(pending: list[bytes] | None, data: bytes, transport: asyncio.Transport) -> list[bytes]:
    """Keep bytes that arrive before both sides are linked; past EARLY_LIMIT bytes, stop reading until the link
    (which flushes them and resumes reading)."""
    if pending is None:
        pending = [data]
    else:
        pending.append(data)
    if sum(map(len, pending)) > EARLY_LIMIT:
        transport.pause_reading()
    return pending


class Client(asyncio.Protocol):
    """The client side of one proxied connection; owns the connection's state and accounting."""

    __slots__ = (
        "_born",
        "_done",
        "_eof",
        "_fe",
        "_full",
        "_idle",
        "_lost",
        "_peer",
        "_pending",
        "_pool",
        "_rec",
        "_scopes",
        "_server",
        "_task",
        "_timed_out",
        "_up",
        "_why",
        "transport",
    )

    transport: asyncio.Transport

    def __init__(self, frontend: ProxyFrontend) -> None:
        self._fe = frontend
        self._peer: asyncio.Transport | None = None  # the server's transport, once linked
        self._up: _Upstream | None = None
        self._pending: list[bytes] | None = None  # what the client sent before the link
        self._pool: Pool | None = None
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._timed_out = False  # the connect attempt in progress was cancelled by its timer
        self._scopes: tuple[Counters, ...] = ()
        self._rec: ConnectionRecord | None = None  # [log] connections: this connection's counters
        self._eof = False  # the client has sent EOF
        self._full = False  # the client transport's write buffer is above its high-water mark
        self._lost = False  # the client transport is gone
        self._done = False  # accounting done
        self._idle = 0  # idle sweeps since the last byte either way (ProxyFrontend._sweep)
        self._born, self._why = 0.0, 0  # when accepted; the scheduler's detail of the pick (GET /flows)

    # The loops give a TCP transport (uvloop's is no asyncio.Transport subclass but has the same methods).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        # Early client bytes should wait in the kernel until a server is connected. asyncio's loop honours this;
        # uvloop starts reading after connection_made anyway, so data_received also buffers one chunk and pauses.
        transport.pause_reading()
        fe = self._fe
        config = fe.config
        if config is not fe._scopes_config:
            config = fe._refresh()
        scopes = self._scopes = fe._scopes
        if CONNECTIONS.on:  # the per-connection line: its own counters, counted with the other scopes
            self._rec = rec = ConnectionRecord(transport.get_extra_info("peername"))
            scopes = self._scopes = (*scopes, rec)
        for c in scopes:  # stats.opened, inlined
            c.total_connections += 1
            c.current_connections += 1
        fe._conns.add(self)
        assert fe._loop is not None
        self._born = fe._loop.time()
        pool = fe.pools.get(config.backend)
        candidates: list[Server] = []
        if pool is not None:
            h = 0 if pool.scheduler_name in _HASH_FREE_SCHEDULERS else fe._flow_hash(transport)
            candidates = pool.candidates(h, fe.max_attempts)
            self._why = pool.pick_detail()
        if not candidates:
            refused(scopes)
            limited.log(logging.WARNING, (config.name, "no_server"), "event=refused frontend=%s backend=%s reason=no_server client=%s", config.name, config.backend, transport.get_extra_info("peername"))  # fmt: skip
            _reset(transport)
            return
        self._pool = pool
        self._task = fe._loop.create_task(self._connect(candidates, config.backend))

    async def _connect(self, candidates: list[Server], backend: str) -> None:  # one loop over the attempts
        fe = self._fe
        loop = fe._loop
        assert loop is not None and self._pool is not None
        timeout = fe.connect_timeout or self._pool.config.connect_timeout
        error: BaseException
        local_deadline = 0.0  # while this host is out of descriptors: retry the same server until then
        i = 0
        while i < len(candidates):
            server = candidates[i]
            i += 1
            up = _Upstream(self)
            addr = server.addr
            # A plain timer rather than asyncio.timeout(): measurably cheaper per connection.
            timer = loop.call_later(timeout, self._connect_timed_out)
            try:
                transport, _ = await loop.create_connection(up, addr.host, addr.port)
            except asyncio.CancelledError:
                if not self._timed_out:
                    raise  # the client went away, or the frontend is closing
                self._timed_out = False
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                if self._lost:
                    return
                error = TimeoutError(f"no connection after {timeout:g}s")
            except Exception as exc:  # OSError, or anything odd from the loop: try the next one
                if is_local_error(exc):  # this host ran out of something: not the server's fault
                    timer.cancel()
                    local_deadline = local_deadline or loop.time() + timeout
                    if await fe.local_error(cast(OSError, exc), server.name, local_deadline):
                        i -= 1  # waited a little (accepting paused meanwhile): the same server again
                        continue
                    self._task = None
                    refused(self._scopes)
                    if not self._lost:
                        _reset(self.transport)
                    return
                error = exc
            else:
                timer.cancel()
                self._task = None
                if self._lost:
                    transport.close()
                    return
                self._why = self._why if i == 1 else 1 - i  # GET /flows: -N, the Nth fallback after the pick
                self._link(up, transport, server, backend)
                return
            timer.cancel()
            failed((fe.stats.server(backend, server.name),))
            limited.log(logging.WARNING, (backend, server.name), "event=connect_failed frontend=%s backend=%s server=%s addr=%s error=%r", fe.config.name, backend, server.name, addr, error)  # fmt: skip
        self._task = None
        failed(self._scopes)
        limited.log(logging.WARNING, (fe.config.name, "all_failed"), "event=refused frontend=%s backend=%s reason=all_failed attempts=%d", fe.config.name, backend, len(candidates))  # fmt: skip
        if not self._lost:
            _reset(self.transport)

    def _connect_timed_out(self) -> None:
        task = self._task
        if task is not None and not task.done():
            self._timed_out = True
            task.cancel()

    def _link(self, up: _Upstream, transport: asyncio.Transport, server: Server, backend: str) -> None:
        """The server accepted: account for it, pass on what either side sent meanwhile, start relaying."""
        assert self._pool is not None
        self._pool.acquire(server)
        self._server = server
        server_scope = self._fe.stats.server(backend, server.name)
        opened((server_scope,))
        # The last scope is the connection's own (its bytes, for GET /flows: convey.proxy.listeners).
        scopes = self._scopes = up._scopes = (*self._scopes, server_scope, Counters())
        self._up = up
        up._linked = True
        client = self.transport
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "frontend=%s event=connected backend=%s server=%s client=%s",
                self._fe.config.name,
                backend,
                server.name,
                client.get_extra_info("peername"),
            )
        client.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self._fe.config.tcp_keepalive:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_keepalive(sock)
        # server -> client first: the server may already have answered, or even gone away (uvloop reads at once).
        up._peer = client
        if up._pending is not None:
            for data in up._pending:
                client.write(data)
                for c in scopes:
                    c.bytes_rx += len(data)
            up._pending = None
        if up._lost:
            client.close()  # what the server sent is flushed first
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._peer = transport
        if self._pending is not None:
            for data in self._pending:
                transport.write(data)
                for c in scopes:
                    c.bytes_tx += len(data)
            self._pending = None
        if self._eof and up._eof:
            self._close_both()
            return
        # Resume reading each side unless it has ended, or the flush above filled the other side's buffer (then
        # resume_writing resumes it once drained).
        if self._eof:
            transport.write_eof()
        elif not up._full:
            client.resume_reading()
        if up._eof:
            client.write_eof()
        elif not self._full:
            transport.resume_reading()

    # -- client -> server -----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._idle = 0
        peer = self._peer
        if peer is None:
            # Before the link (uvloop only: asyncio's loop honours the pause in connection_made).
            self._pending = _hold_early(self._pending, data, self.transport)
            return
        peer.write(data)
        n = len(data)
        for c in self._scopes:
            c.bytes_tx += n

    def eof_received(self) -> bool:
        self._eof = True
        self._idle = 0
        peer = self._peer
        if peer is not None:
            if self._up is not None and self._up._eof:
                self._close_both()
            else:
                peer.write_eof()
        return True  # keep the client transport open: the server may still answer

    def _close_both(self) -> None:
        self.transport.close()
        if self._peer is not None:
            self._peer.close()

    # -- flow control: the client is slow to read what the server sends -------------------------------------------

    def pause_writing(self) -> None:
        self._full = True
        up = self._up
        if up is not None and not up._lost and not up._eof:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._full = False
        self._idle = 0  # the client read what was buffered for it: not idle
        up = self._up
        if up is not None and not up._lost and not up._eof:
            up.transport.resume_reading()

    # -- the end ----------------------------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        up = self._up
        if up is None:
            task = self._task
            if task is not None and not task.done():
                task.cancel()
            self._finish()
        elif up._lost:
            self._finish()
        else:
            up.transport.close()  # flushes what the client sent before going away
        if exc is not None:
            if self._rec is not None and not self._rec.end:
                self._rec.end = "client_error"
            if log.isEnabledFor(logging.DEBUG):
                log.debug("frontend=%s event=client_lost error=%r", self._fe.config.name, exc)

    def abort(self) -> None:
        """Drop the connection now (idle timeout, or shutdown after the drain period)."""
        if self._rec is not None and not self._rec.end:
            self._rec.end = "aborted"
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        up = self._up
        if up is not None and not up._lost:
            up.transport.abort()
        if not self._lost:
            self.transport.abort()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        for c in self._scopes:  # stats.closed, inlined
            c.current_connections -= 1
        server = self._server
        if server is not None:
            assert self._pool is not None
            self._pool.release(server)
        self._fe._forget(self)
        if self._rec is not None:
            self._rec.close(self._fe.config.name, self._fe.config.backend, server.name if server else None)


class _Upstream(asyncio.Protocol):
    """The server side of one proxied connection."""

    __slots__ = (
        "_client",
        "_eof",
        "_full",
        "_idle",
        "_linked",
        "_lost",
        "_peer",
        "_pending",
        "_scopes",
        "transport",
    )

    transport: asyncio.Transport

    def __init__(self, client: Client) -> None:
        self._client = client
        self._peer: asyncio.Transport | None = None  # the client's transport, once linked
        self._pending: list[bytes] | None = None  # what the server sent before the link
        self._scopes: tuple[Counters, ...] = ()
        self._eof = False  # the server has sent EOF
        self._full = False  # the server transport's write buffer is above its high-water mark
        self._lost = False
        self._linked = False  # the connect attempt succeeded and the client is relayed to this server
        self._idle = 0  # idle sweeps since the server's last byte (or drain)

    def __call__(self) -> _Upstream:
        # The protocol factory for create_connection: this very instance, already tied to its client.
        return self

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.pause_reading()  # until linked (see Client.connection_made about uvloop)

    def data_received(self, data: bytes) -> None:
        self._idle = 0
        peer = self._peer
        if peer is None:  # before the link, as in Client.data_received
            self._pending = _hold_early(self._pending, data, self.transport)
            return
        peer.write(data)
        n = len(data)
        for c in self._scopes:
            c.bytes_rx += n

    def eof_received(self) -> bool:
        self._eof = True
        self._idle = 0
        peer = self._peer
        if peer is not None and not self._client._lost:
            if self._client._eof:
                self._client._close_both()
            else:
                peer.write_eof()
        return True  # keep the server transport open: the client may still send

    def pause_writing(self) -> None:
        self._full = True
        client = self._client
        if not client._lost and not client._eof:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        self._full = False
        self._idle = 0
        client = self._client
        if not client._lost and not client._eof:
            client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._linked:
            return  # not linked yet (see Client._link) or an abandoned connect attempt
        client = self._client
        if client._lost:
            client._finish()
        else:
            client.transport.close()  # flushes what the server sent before going away
        if exc is not None:
            if client._rec is not None and not client._rec.end:
                client._rec.end = "server_error"
            if log.isEnabledFor(logging.DEBUG):
                log.debug("frontend=%s event=server_lost error=%r", client._fe.config.name, exc)
