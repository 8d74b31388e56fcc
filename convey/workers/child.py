"""A worker process: one data plane running its share of the config, driven by the supervisor.

Started by :mod:`convey.workers.supervisor` as ``python -m convey.workers.child FD``: FD is its end of a socket
pair, over which :class:`multiprocessing.connection.Connection` carries pickled messages. The first one is the
:class:`WorkerSpec`; after it the supervisor sends one request at a time and waits for its answer:

- ``("states", {backend: {server: (healthy, overlay)}})``: the supervisor's health checks and runtime API
  overlay (workers check nothing);
- ``("flows", query)``: answered ``("flows", selection)``: its flows for GET /flows;
- ``("config", Config, plan)``: a reload the supervisor validated (and, passthrough offload, its mark plan);
  answered ``("ok", changes)`` or ``("error", text)``;
- ``("plan", plan)``: passthrough offload: a new mark plan (a removed server's last connection closed);
- ``("stats",)``: answered ``("stats", document, retired, in_use)``: this worker's /stats document, the servers
  removed from the config that still carry its flows (passthrough keeps their return rules until they drain)
  and, with offload, the servers conntrack holds its connections to (their marks stay);
- ``("stop", timeout)``: stop the plane (draining for up to ``timeout`` seconds) and exit.

The worker never outlives the supervisor: PR_SET_PDEATHSIG sends it SIGTERM when the supervisor's thread that
started it ends, and an end of file on the socket stops it too. SIGINT is ignored (a terminal's ^C reaches the
whole process group; the supervisor decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from convey.balancing.pool import Pool
from convey.config import Config
from convey.logs import CONNECTIONS
from convey.modes import Mode
from convey.stats import Stats, snapshot
from convey.workers.slices import worker_config

log = logging.getLogger("convey.worker")

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    count: int
    mode: Mode
    config: Config  # the whole config; the worker takes its share with ``worker_config``
    offload: bool
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # Pool.server_states() by backend
    log_level: str = "INFO"
    log_format: str = "kv"
    drain_timeout: float = 5.0
    plan: Any = None  # passthrough offload: the supervisor's OffloadPlan (the same marks in every worker)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``sig`` when the parent dies (a ``preexec_fn``, and again in the child's main)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:  # pragma: no cover - Linux always has it
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


class WorkerLogFilter(logging.Filter):
    """Adds ``worker=N`` to every line of a worker, so the supervisor's and workers' lines can be told apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f" worker={index}"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.endswith(self.suffix):
            record.msg += self.suffix
        return True


class Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection) -> None:
        from convey.engine import build_plane

        self.spec = spec
        self.conn = conn
        self.mode = spec.mode
        self.config = spec.config
        self.stats = Stats(mode=self.mode, started=time.time())
        self.pools = {name: Pool(b, self.mode) for name, b in spec.config.backends.items()}
        self._states(spec.states)
        options: dict[str, Any] = {"reuse_port": True} if self.mode == Mode.PROXY else {"manage_rules": False}
        if spec.plan is not None:
            options["worker"] = spec.index
        self.plane = build_plane(self.mode, self.pools, self.stats, options, spec.offload)
        self._set_plan(spec.plan)
        self._stop = asyncio.Event()
        self._busy: asyncio.Task[None] | None = None

    def own(self, config: Config) -> Config:
        return worker_config(config, self.mode, self.spec.index, self.spec.count)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        CONNECTIONS.on = self.config.log.connections  # [log] connections: this worker's connection lines
        await self.plane.start(self.own(self.config))
        try:
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.conn.send(("ready", os.getpid()))
            loop.add_reader(self.conn.fileno(), self._readable)
            await self._stop.wait()
        finally:
            loop.remove_reader(self.conn.fileno())
            await self.plane.stop(self.spec.drain_timeout)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):  # the supervisor is gone
            self._stop.set()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "states":
            self._states(message[1])
            self.conn.send(("ok", []))
        elif kind == "flows":
            flows = getattr(self.plane, "flows", None)
            self.conn.send(("flows", flows(message[1]) if flows is not None else ([], 0)))
        elif kind == "stats":
            self.conn.send(("stats", self.snapshot(), self.retired(), self.in_use()))
        elif kind == "config":
            self._set_plan(message[2])
            self._busy = asyncio.get_running_loop().create_task(self._apply(message[1]))
        elif kind == "plan":
            self._set_plan(message[1])
            self.conn.send(("ok", []))
        elif kind == "stop":
            self.spec = _with_timeout(self.spec, float(message[1]))
            self._stop.set()
        else:
            self.conn.send(("error", f"unknown request {kind!r}"))

    def _set_plan(self, plan: Any) -> None:
        set_plan = getattr(self.plane, "set_plan", None)
        if plan is not None and set_plan is not None:
            set_plan(plan)

    def in_use(self) -> list[str]:
        """Passthrough offload: the servers conntrack holds this worker's connections to."""
        servers_in_use = getattr(self.plane, "servers_in_use", None)
        return list(servers_in_use()) if servers_in_use is not None else []

    def _states(self, states: dict[str, dict[str, Any]]) -> None:
        for backend, servers in states.items():
            pool = self.pools.get(backend)
            if pool is not None:
                pool.set_states(servers)

    async def _apply(self, config: Config) -> None:
        """A reload, validated by the supervisor: the pools and the plane take it, as ``Engine._apply_config``."""
        try:
            for name, backend in config.backends.items():
                pool = self.pools.get(name)
                if pool is None:
                    self.pools[name] = Pool(backend, self.mode)
                else:
                    pool.update(backend)
            for name in list(self.pools):
                if name not in config.backends:
                    del self.pools[name]
            self.config = config
            CONNECTIONS.on = config.log.connections
            changes = await self.plane.apply(self.own(config))
            self.conn.send(("ok", changes))
        except Exception as exc:  # answered, never raised: the supervisor logs it
            log.exception("event=worker_reload_error")
            self.conn.send(("error", f"{type(exc).__name__}: {exc}"))

    def snapshot(self) -> dict[str, Any]:
        frontends = {f.name: f.backend for f in self.config.frontends.values()}
        return snapshot(self.stats, self.pools, frontends, time.time())

    def retired(self) -> list[tuple[str, str, str, int]]:
        """Servers removed from the config that still carry this worker's flows: (backend, name, host, port)."""
        return [
            (name, server.name, server.addr.host, server.addr.port)
            for name, pool in self.pools.items()
            for server in pool.retired.values()
        ]


def _with_timeout(spec: WorkerSpec, timeout: float) -> WorkerSpec:
    return replace(spec, drain_timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    conn = Connection(int(argv[0]))
    spec: WorkerSpec = conn.recv()
    if os.getppid() == 1:  # the supervisor died before PR_SET_PDEATHSIG took effect
        return 1
    from convey.cli import setup_logging

    setup_logging(spec.log_level, spec.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerLogFilter(spec.index))
    worker = Worker(spec, conn)
    try:
        _run(worker)
    except Exception as exc:
        log.error("event=worker_failed error=%r", f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 2
    return 0


def _run(worker: Worker) -> None:
    if os.environ.get("CONVEY_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(worker.run())
            return
    asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
