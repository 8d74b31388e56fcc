"""TCP health checks: one asyncio task per backend, all servers of a backend checked concurrently.

A check is a TCP connect that must complete within ``health_check_timeout``. Results go to :meth:`Pool.report_check`,
which applies the ``rise``/``fall`` thresholds; state changes are logged here. Checks never block the data path: they
are plain coroutines on the same loop, with a timeout.

A check that fails for lack of a *local* resource (no descriptor, no buffer memory, no free local port: see
:mod:`convey.proxy.resources`) says nothing about the server: it is not reported to the pool (the server keeps its
state), it is counted in ``local_errors`` (/stats ``health``) and logged at most once per ``LOG_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from convey.balancing.pool import Pool, Server
from convey.proxy.resources import is_local_error
from convey.stats import Stats

log = logging.getLogger("convey.health")

LOG_EVERY = 10.0  # seconds between two event=health_local_error lines


class LocalResourceError(Exception):
    """A check could not be made: this host ran out of a resource (the server is not to blame)."""


async def tcp_check(host: str, port: int, timeout: float) -> str | None:
    """Connect once; None on success, else a short reason. Raises LocalResourceError when the check could not be
    made for lack of a local resource."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"connect timeout after {timeout:g}s"
    except OSError as exc:
        if is_local_error(exc):
            raise LocalResourceError(exc.strerror or str(exc)) from exc
        return exc.strerror or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


class HealthChecker:
    """Runs checks for every pool in ``pools`` (the engine's live dict, re-read every round)."""

    def __init__(
        self,
        pools: Mapping[str, Pool],
        on_change: Callable[[Pool, Server, bool], None] | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.pools = pools
        self.on_change = on_change
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.local_errors = 0  # checks not made for lack of a local resource
        self._last_local_log = -LOG_EVERY
        self._unlogged = 0
        if stats is not None:
            stats.sections["health"] = self.section

    def section(self) -> dict[str, Any]:
        """/stats ``health``."""
        return {"local_errors": self.local_errors}

    def sync(self) -> None:
        """Start tasks for new pools and stop those of removed ones (call after a reload)."""
        for name in list(self._tasks):
            if name not in self.pools:
                self._tasks.pop(name).cancel()
        for name in self.pools:
            if name not in self._tasks:
                self._tasks[name] = asyncio.get_running_loop().create_task(
                    self._run(name), name=f"health-{name}"
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check_pool(self, pool: Pool) -> None:
        """One round: check every server of ``pool`` at once and report the results."""
        servers = list(pool.servers.values())
        timeout = pool.config.health_check_timeout
        results = await asyncio.gather(
            *(tcp_check(s.addr.host, s.addr.port, timeout) for s in servers), return_exceptions=True
        )
        for server, error in zip(servers, results, strict=True):
            if isinstance(error, LocalResourceError):
                self._local_error(pool, server, error)
                continue
            if isinstance(error, BaseException):
                raise error
            changed = pool.report_check(server.name, error is None, error)
            if changed is None:
                continue
            if changed:
                log.warning(
                    "event=server_up backend=%s server=%s addr=%s after=%d_checks",
                    pool.name,
                    server.name,
                    server.addr,
                    pool.config.rise,
                )
            else:
                log.warning(
                    "event=server_down backend=%s server=%s addr=%s after=%d_checks error=%r",
                    pool.name,
                    server.name,
                    server.addr,
                    pool.config.fall,
                    error,
                )
            if self.on_change is not None:
                self.on_change(pool, server, changed)

    def _local_error(self, pool: Pool, server: Server, error: LocalResourceError) -> None:
        self.local_errors += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_local_log < LOG_EVERY:
            self._unlogged += 1
            return
        log.warning(
            "event=health_local_error backend=%s server=%s error=%r not_logged=%d (check skipped, state kept)",
            pool.name,
            server.name,
            str(error),
            self._unlogged,
        )
        self._last_local_log = now
        self._unlogged = 0

    async def _run(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pool = self.pools.get(name)
            if pool is None:
                return
            started = loop.time()
            try:
                await self.check_pool(pool)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a check must not stop health checking for good
                log.exception("event=health_check_error backend=%s", name)
            interval = pool.config.health_check_interval
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
