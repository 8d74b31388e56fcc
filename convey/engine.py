"""Wiring: one running balancer for a mode, built from a config.

The engine owns the live state (pools, stats), the data plane for the mode, the health checker, the config watcher
and the stats service, all on one asyncio loop (the stats service answers from its own thread and asks the loop for
a consistent snapshot). ``run`` returns when SIGTERM or SIGINT arrives; SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from convey import systemd
from convey.balancing.pool import Pool, Server
from convey.bgp import choose_route
from convey.bgp.announcer import Announcer
from convey.config import (
    Config,
    ConfigError,
    check_workers,
    offloaded,
    validate_for_mode,
    with_offload,
    with_workers,
    workers_for,
    workers_key,
)
from convey.control.api import Control
from convey.control.sources import engine_control
from convey.errors import StartupError
from convey.health import HealthChecker
from convey.logs import CONNECTIONS
from convey.modes import Mode
from convey.proxy.resources import raise_nofile_limit
from convey.reload import ConfigWatcher, describe
from convey.stats import Stats, snapshot
from convey.web import StatsServer
from convey.workers.supervisor import WorkerSet

log = logging.getLogger("convey.engine")


class DataPlane(Protocol):
    async def start(self, config: Config) -> None: ...
    async def apply(self, config: Config) -> list[str]: ...
    async def stop(self, timeout: float) -> None: ...


def _packet_planes() -> dict[tuple[Mode, bool], Callable[..., DataPlane]]:
    """The packet planes by (mode, offloaded)."""
    from convey.dataplane.dsr_offload_plane import DsrOffloadPlane
    from convey.dataplane.dsr_plane import DsrPlane
    from convey.dataplane.passthrough_offload_plane import PassthroughOffloadPlane
    from convey.dataplane.passthrough_plane import PassthroughPlane

    planes: dict[tuple[Mode, bool], Callable[..., DataPlane]] = {
        (Mode.PASSTHROUGH, False): PassthroughPlane,
        (Mode.PASSTHROUGH, True): PassthroughOffloadPlane,
        (Mode.DSR, False): DsrPlane,
        (Mode.DSR, True): DsrOffloadPlane,
    }
    return planes


def build_plane(
    mode: Mode, pools: dict[str, Pool], stats: Stats, options: dict[str, Any], offload: bool = False
) -> DataPlane:
    """The data plane for ``mode``; ``offload`` (``convey.config.offloaded``) picks the offload plane."""
    if mode is Mode.PROXY:
        from convey.proxy.listeners import ProxyPlane

        return ProxyPlane(pools, stats, **options)
    try:
        planes = _packet_planes()
    except ImportError as exc:
        raise StartupError(f"{mode} mode is not available: {exc}") from None
    plane = planes[(mode, offload)]
    return plane(pools, stats, **options)


class Engine:
    def __init__(
        self,
        config: Config,
        mode: Mode | str,
        watch: bool = True,
        force_offload: bool = False,
        **options: Any,
    ) -> None:
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise StartupError(f"unknown mode {mode!r} (modes: {', '.join(Mode)})") from None
        # ``--offload`` on the command line: every reloaded file is read with offload on too.
        self.force_offload = force_offload
        self.config = with_offload(config, self.mode) if force_offload else config
        config = self.config
        check_workers(config, self.mode)  # again: --offload may have come after the file was checked
        self.watch = watch
        self.stats = Stats(mode=self.mode, started=time.time())
        self.pools: dict[str, Pool] = {name: Pool(b, self.mode) for name, b in config.backends.items()}
        self.workers: WorkerSet | None = None
        self.plane: DataPlane
        log_options = {key: options.pop(key) for key in ("log_level", "log_format") if key in options}
        if workers_for(config, self.mode) > 1:
            # A supervisor: N worker processes are the data plane (convey/workers/supervisor.py).
            self.plane = self.workers = WorkerSet(self.mode, self.pools, self.stats, **options, **log_options)
        else:
            self.plane = build_plane(self.mode, self.pools, self.stats, options, offloaded(config, self.mode))
        self.health = HealthChecker(self.pools, on_change=self._health_changed, stats=self.stats)
        self.bgp: Announcer | None = None  # [bgp]: VIPs announced while servable (convey/bgp/)
        if config.bgp is not None:
            self.bgp = Announcer(config.bgp)
            self.stats.sections["bgp"] = self.bgp.section
        self.watcher: ConfigWatcher | None = None
        self.web: StatsServer | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._apply_lock = asyncio.Lock()

    # -- stats ----------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        frontends = {f.name: f.backend for f in self.config.frontends.values()}
        return snapshot(self.stats, self.pools, frontends, time.time())

    async def snapshot_async(self) -> dict[str, Any]:
        """The snapshot; with worker processes, their counters asked for now and summed."""
        if self.workers is not None:
            return await self.workers.snapshot(self.snapshot())
        return self.snapshot()

    def snapshot_threadsafe(self, timeout: float = 5.0) -> dict[str, Any]:
        """Called from the stats thread: computes the snapshot on the loop, so it sees one consistent state."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.snapshot()
        if self.workers is not None:
            return asyncio.run_coroutine_threadsafe(self.snapshot_async(), loop).result(timeout + 10)
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def fill() -> None:
            try:
                future.set_result(self.snapshot())
            except Exception as exc:  # pragma: no cover - surfaced to the HTTP client as a 500
                future.set_exception(exc)

        loop.call_soon_threadsafe(fill)
        return future.result(timeout)

    def _control(self) -> Control:
        """The runtime API over this engine (with workers: their flows, and every change sent to them)."""
        control = engine_control(self, lambda: self._loop)
        return self.workers.control(control) if self.workers is not None else control

    def _health_changed(self, pool: Pool, server: Server, healthy: bool) -> None:
        self._bgp_update()
        if self.workers is not None:
            self.workers.health_changed(pool, server, healthy)

    # -- reload ---------------------------------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Schedule a validated config to be applied (from the watcher)."""
        asyncio.get_running_loop().create_task(self._apply(config))

    async def _apply(self, config: Config) -> None:
        """Apply a reloaded config; nothing escapes: a rejection or an unexpected error is logged and counted."""
        try:
            validate_for_mode(config, self.mode)
            await self._apply_config(config)
            systemd.ready()  # after RELOADING=1 (SIGHUP); a rejected reload says READY=1 in _reload_failed
        except ConfigError as exc:
            log.error("event=reload_rejected error=%r (running config kept)", str(exc))
            self._reload_failed(exc)
        except Exception as exc:
            log.error("event=reload_error stage=apply error=%r", describe(exc))
            log.debug("event=reload_error_traceback", exc_info=exc)
            self._reload_failed(exc)

    async def _apply_config(self, config: Config) -> None:
        if self.force_offload:
            config = with_offload(config, self.mode)
        running = workers_for(self.config, self.mode)
        if workers_for(config, self.mode) != running:
            log.warning(
                "event=reload_workers_kept key=%s file=%d running=%d (the number of workers changes at restart)",
                workers_key(self.mode),
                workers_for(config, self.mode),
                running,
            )
            config = with_workers(config, self.mode, running)
        if offloaded(config, self.mode) != offloaded(self.config, self.mode):
            state = "on" if offloaded(self.config, self.mode) else "off"
            error = ConfigError(
                config.path,
                "passthrough.offload" if self.mode == Mode.PASSTHROUGH else "dsr.offload",
                f"offload cannot change while convey runs (it is {state}); restart convey to change it",
            )
            log.error("event=reload_rejected error=%r", str(error))
            self._reload_failed(error)
            return
        async with self._apply_lock:
            changes: list[str] = []
            for name, backend in config.backends.items():
                pool = self.pools.get(name)
                if pool is None:
                    self.pools[name] = Pool(backend, self.mode)
                    changes.append(f"backend {name} added with {len(backend.servers)} servers")
                else:
                    changes += [f"backend {name}: {c}" for c in pool.update(backend)]
            for name in list(self.pools):
                if name not in config.backends:
                    del self.pools[name]
                    changes.append(f"backend {name} removed")
            self.config = config
            CONNECTIONS.on = config.log.connections
            changes += await self.plane.apply(config)
            self.health.sync()
            if self.bgp is not None:
                self.bgp.reconfigure(config.bgp)
                self._bgp_update()
            elif config.bgp is not None:
                changes.append("[bgp] added: it takes effect when convey restarts")
            self.stats.reloads += 1
            self.stats.last_reload_error = None
            if not changes:
                changes = ["no changes"]
            for change in changes:
                log.info("event=reload_applied change=%r", change)

    def _reload_failed(self, exc: Exception) -> None:
        systemd.ready()  # the running config stays: ready again
        if isinstance(exc, ConfigError):
            self.stats.reload_failures += 1
            self.stats.last_reload_error = str(exc)
        else:
            self.stats.reload_errors += 1
            self.stats.last_reload_error = describe(exc)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def _bgp_update(self) -> None:
        if self.bgp is not None:
            self.bgp.update(self.pools, self.config.frontends.values())

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, drain_timeout: float = 5.0) -> None:
        self._loop = asyncio.get_running_loop()
        raise_nofile_limit()  # all modes; a proxied connection holds 2 descriptors, the usual soft limit is 1024
        CONNECTIONS.on = self.config.log.connections  # [log] connections: one line per connection at its end
        await self.plane.start(self.config)
        try:
            self.health.sync()
            if self.bgp is not None:
                self._bgp_update()
                await self.bgp.start()
            if self.watch:
                self.watcher = ConfigWatcher(self.config.path, self.apply, self._reload_failed)
                self.watcher.start()
            if self.config.stats.port is not None:
                self.web = StatsServer(
                    self.config.stats.address,
                    self.config.stats.port,
                    self.snapshot_threadsafe,
                    self._control(),  # the runtime API (convey/control/)
                )
                if self.bgp is not None:  # POST /debug/choose: a tier's balancers agree (docs/scale-out.md)
                    choose_route.install(self.web.app, self.pools, lambda: self.config, lambda: self._loop)
                self.web.start()
                log.info(
                    "event=stats_listening url=http://%s:%d/stats", self.config.stats.address, self.web.port
                )
            self._install_signals()
            log.info(
                "event=started mode=%s config=%s frontends=%d backends=%d",
                self.mode,
                self.config.path,
                len(self.config.frontends),
                len(self.config.backends),
            )
            systemd.ready()
            await self._stop.wait()
            systemd.stopping()
            log.info(
                "event=stopping drain_timeout=%gs open_connections=%d",
                drain_timeout,
                self.stats.total.current_connections,
            )
            if self.bgp is not None:  # routers stop sending new connections here first
                await self.bgp.withdraw_all()
                await asyncio.sleep(self.bgp.config.withdraw_grace)
        finally:
            self._remove_signals()
            if self.watcher is not None:
                await self.watcher.stop()
            await self.health.stop()
            if self.bgp is not None:
                await self.bgp.stop()
            await self.plane.stop(drain_timeout)
            if self.web is not None:
                self.web.stop()
            log.info("event=stopped")

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        log.info("event=sighup")
        systemd.reloading()
        if self.watcher is not None:
            self.watcher.request_reload()
        else:
            ConfigWatcher(self.config.path, self.apply, self._reload_failed).reload("signal")
