"""The supervisor's side of worker processes: ``WorkerSet``, the data plane of an engine that runs N workers.

With ``workers = N > 1`` the engine (convey/engine.py) keeps everything that must happen once: the config, its
reload, the health checks, the stats service, the iptables rules. Its data plane is this set of N processes
(:mod:`convey.workers.child`), each running the mode's own plane on its share of the config
(:func:`convey.workers.slices.worker_config`). The set:

- starts the workers and waits until each has bound its queue or listeners (a failure stops the others and is a
  start error naming the worker and its reason);
- packet modes: checks or installs the rules of all N queues at start (``convey rules install`` renders the same
  with the config's ``workers``), brings them in line on reload and keeps a removed server's return rules while
  any worker still has flows to it (:mod:`convey.workers.rules`, with passthrough offload's mark plan);
- sends every reload to every worker (validated once, before) and every health change;
- polls every worker's counters every ``POLL_INTERVAL`` and answers /stats with their sum and a per-worker list
  (:mod:`convey.workers.merge`);
- restarts a worker that dies (after ``RESTART_DELAY``, doubling up to ``MAX_RESTART_DELAY`` while it keeps
  dying within ``STABLE_AFTER`` seconds) and logs it. What its connections become depends on the mode: see
  docs/architecture.md, "Workers".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from convey import stats as st
from convey.balancing.pool import Pool, Server
from convey.config import Config, offloaded, workers_for
from convey.control.api import Control
from convey.errors import ConveyError, StartupError
from convey.modes import Mode
from convey.workers.child import WorkerSpec, die_with_parent
from convey.workers.merge import merge, worker_entry
from convey.workers.rules import WorkerRules
from convey.workers.slices import return_port_ranges

log = logging.getLogger("convey.workers")

POLL_INTERVAL = 1.0
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 30.0
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
STABLE_AFTER = 10.0


class WorkerError(ConveyError):
    """A worker did not answer, answered an error, or is not running."""


@dataclass(eq=False)
class WorkerHandle:
    index: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    started: float
    restarts: int = 0  # how often worker ``index`` was restarted since the supervisor started
    quick_deaths: int = 0  # deaths in a row, each within STABLE_AFTER of its start (the backoff's exponent)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time, from any thread
    last_doc: dict[str, Any] | None = None
    retired: list[tuple[str, str, str, int]] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)
    pidfd: int = -1

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def roundtrip(self, message: tuple[Any, ...], timeout: float = REQUEST_TIMEOUT) -> tuple[Any, ...]:
        """One request and its answer, blocking (one at a time per worker); WorkerError when it cannot be had."""
        with self.lock:
            if not self.alive:
                raise WorkerError(f"worker {self.index} is not running")
            try:
                self.conn.send(message)
                if not self.conn.poll(timeout):
                    raise WorkerError(
                        f"worker {self.index} (pid {self.proc.pid}) did not answer in {timeout:g}s"
                    )
                answer: tuple[Any, ...] = self.conn.recv()
            except (OSError, EOFError) as exc:
                reason = str(exc) or "connection closed"
                raise WorkerError(f"worker {self.index} (pid {self.proc.pid}): {reason}") from None
            return answer

    async def request(self, message: tuple[Any, ...], timeout: float = REQUEST_TIMEOUT) -> tuple[Any, ...]:
        """:meth:`roundtrip` in a thread, so the loop goes on meanwhile."""
        return await asyncio.to_thread(self.roundtrip, message, timeout)


class WorkerSet:
    """N worker processes as one data plane (see the module doc)."""

    def __init__(
        self,
        mode: Mode,
        pools: dict[str, Pool],
        stats: st.Stats,
        install_rules: bool = False,
        log_level: str = "INFO",
        log_format: str = "kv",
    ) -> None:
        self.mode = mode
        self.pools = pools
        self.stats = stats
        self.log_level = log_level
        self.log_format = log_format
        self.config: Config | None = None
        self.count = 0
        self.workers: list[WorkerHandle | None] = []
        self.dead_docs: list[dict[str, Any]] = []  # the last report of every worker that died
        self.deaths = 0
        self._stopping = False
        self.rules = WorkerRules(mode, install_rules, 0)
        self._sent_states: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        self.config = config
        self.count = workers_for(config, self.mode)
        self.rules.count = self.count
        if self.mode != Mode.PROXY:
            await asyncio.to_thread(self.rules.start, config)
        try:
            self.workers = [None] * self.count
            for index in range(self.count):
                self.workers[index] = await self._spawn(index, restarts=0)
        except BaseException:
            await self.stop(0)
            raise
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="worker-poll")
        log.info(
            "event=workers_started mode=%s workers=%d pids=%s",
            self.mode,
            self.count,
            ",".join(str(w.proc.pid) for w in self.workers if w is not None),
        )

    def _spec(self, index: int) -> WorkerSpec:
        assert self.config is not None
        return WorkerSpec(
            index=index,
            count=self.count,
            mode=self.mode,
            config=self.config,
            offload=offloaded(self.config, self.mode),
            states=self._states(),
            log_level=self.log_level,
            log_format=self.log_format,
            plan=self.rules.plan,
        )

    async def _spawn(self, index: int, restarts: int) -> WorkerHandle:
        """Start worker ``index`` and wait for it to be ready. Called on the loop's (main) thread: the death
        signal fires when the thread that forked the child ends."""
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "convey.workers.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                preexec_fn=die_with_parent,  # only prctl: safe between fork and exec
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        handle = WorkerHandle(index, proc, conn, time.monotonic(), restarts)
        try:
            conn.send(self._spec(index))
            answer = await asyncio.to_thread(_wait_ready, conn, START_TIMEOUT)
        except BaseException:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            conn.close()
            raise
        if answer[0] != "ready":
            await asyncio.to_thread(proc.wait)
            conn.close()
            raise StartupError(f"worker {index} of {self.count} could not start: {answer[1]}")
        handle.pidfd = os.pidfd_open(proc.pid)
        asyncio.get_running_loop().add_reader(handle.pidfd, self._exited, handle)
        return handle

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        handles = [w for w in self.workers if w is not None]
        for handle in handles:
            self._forget(handle)
            if handle.alive:
                with contextlib.suppress(OSError):
                    handle.conn.send(("stop", timeout))
        deadline = time.monotonic() + timeout + 5.0
        for handle in handles:
            await asyncio.to_thread(_wait_or_kill, handle.proc, max(0.1, deadline - time.monotonic()))
            handle.conn.close()
        self.workers = []
        if self.config is not None:
            await self.rules.remove(self.config)

    def _forget(self, handle: WorkerHandle) -> None:
        if handle.pidfd >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(handle.pidfd)
            os.close(handle.pidfd)
            handle.pidfd = -1

    # -- a worker died ----------------------------------------------------------------------------------------

    def _exited(self, handle: WorkerHandle) -> None:
        self._forget(handle)
        code = handle.proc.wait()
        if self._stopping or self.workers[handle.index] is not handle:
            return
        self.deaths += 1
        if handle.last_doc is not None:
            self.dead_docs.append(handle.last_doc)
        handle.conn.close()
        self.workers[handle.index] = None
        quick_deaths = handle.quick_deaths + 1 if time.monotonic() - handle.started < STABLE_AFTER else 0
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** min(max(quick_deaths - 1, 0), 5))
        reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        log.error(
            "event=worker_died worker=%d pid=%d reason=%r restart_in=%gs",
            handle.index,
            handle.proc.pid,
            reason,
            delay,
        )
        self._spawn_task(self._restart(handle.index, delay, handle.restarts + 1, quick_deaths))

    async def _restart(self, index: int, delay: float, restarts: int, quick_deaths: int) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            handle = await self._spawn(index, restarts)
        except Exception as exc:
            log.error("event=worker_restart_failed worker=%d error=%r", index, str(exc))
            retry = min(MAX_RESTART_DELAY, delay * 2)
            self._spawn_task(self._restart(index, retry, restarts + 1, quick_deaths + 1))
            return
        handle.quick_deaths = quick_deaths
        if self._stopping:
            self._forget(handle)
            with contextlib.suppress(OSError):
                handle.conn.send(("stop", 0))
            return
        self.workers[index] = handle
        log.warning("event=worker_restarted worker=%d pid=%d restarts=%d", index, handle.proc.pid, restarts)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reload and health ------------------------------------------------------------------------------------

    async def apply(self, config: Config) -> list[str]:
        """Send a validated reload to every worker; the changes as worker 0 saw them."""
        old = self.config
        self.config = config
        self.rules.new_plan(config)
        answers = await self._ask_all(("config", config, self.rules.plan))
        changes: list[str] = []
        for index, answer in answers.items():
            if isinstance(answer, BaseException) or answer[0] != "ok":
                error = answer if isinstance(answer, BaseException) else answer[1]
                log.error("event=worker_reload_failed worker=%d error=%r", index, str(error))
            elif not changes:
                changes = list(answer[1])
        if self.mode != Mode.PROXY:
            # the workers' pools now hold the servers the reload removed that still carry their flows: learn them
            # before the rules are rendered again, or a removed server's replies would stop reaching its flows
            await self.refresh()
        if (
            self.mode != Mode.PROXY
            and old is not None
            and (old.frontends != config.frontends or old.backends != config.backends)
            and await self.rules.update(config, "reload")
        ):
            changes.append("iptables rules updated for the new config")
        return changes

    def _states(self) -> dict[str, dict[str, Any]]:
        return {name: pool.server_states() for name, pool in self.pools.items()}

    def health_changed(self, pool: Pool, server: Server, healthy: bool) -> None:
        """From the health checker: every worker takes the new states."""
        self.push_states()

    def push_states(self) -> None:
        """Send the servers' health and runtime overlay to every worker (after a check or an API change; the
        poll also sends them whenever they differ from what was sent last)."""
        states = self._sent_states = self._states()
        self._spawn_task(self._ask_all(("states", states)))

    def control(self, control: Control) -> Control:
        """The runtime API ``control`` (over the supervisor's pools) made to see the workers' flows and to send
        every change it makes to them at once."""
        run = control.sources.run

        def run_then_push(fn: Callable[[], Any]) -> Any:
            result = run(fn)
            states = run(self._states)  # on the loop, where the pools live
            if states != self._sent_states:
                self._send_states(states)  # in every worker before the API answers
            return result

        return Control(replace(control.sources, flows=self.flows, run=run_then_push))

    def _send_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Blocking (the API's thread): every live worker takes ``states`` before this returns."""
        self._sent_states = states
        for handle in [w for w in self.workers if w is not None]:
            try:
                handle.roundtrip(("states", states), timeout=5.0)
            except WorkerError as exc:  # a dead worker gets them at its restart
                log.warning("event=worker_states_failed worker=%d error=%r", handle.index, str(exc))

    def flows(self, query: Any) -> Any:
        """GET /flows: every live worker's flows (blocking: the API calls it on the loop, which it then holds
        for one round trip per worker)."""
        from convey.control.flows import merge as merge_flows

        selections = []
        for handle in [w for w in self.workers if w is not None]:
            try:
                answer = handle.roundtrip(("flows", query), timeout=5.0)
            except WorkerError as exc:
                log.warning("event=worker_flows_failed worker=%d error=%r", handle.index, str(exc))
                continue
            if answer[0] == "flows":
                selections.append(answer[1])
        return merge_flows(selections, query.limit)

    async def _ask_all(self, message: tuple[Any, ...]) -> dict[int, tuple[Any, ...] | BaseException]:
        handles = [w for w in self.workers if w is not None]
        answers = await asyncio.gather(*(w.request(message) for w in handles), return_exceptions=True)
        return {w.index: a for w, a in zip(handles, answers, strict=True)}

    # -- counters ---------------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await self.refresh()
            except Exception:
                log.exception("event=worker_poll_error")

    async def refresh(self) -> None:
        """Ask every worker for its counters (kept for when it dies) and follow the retired servers' rules."""
        if self._states() != self._sent_states:
            self.push_states()
        for index, answer in (await self._ask_all(("stats",))).items():
            handle = self.workers[index]
            if handle is None or isinstance(answer, BaseException) or answer[0] != "stats":
                continue
            handle.last_doc, handle.retired, handle.in_use = answer[1], answer[2], answer[3]
        retired = {r for w in self.workers if w is not None for r in w.retired}
        config = self.config
        if retired != self.rules.retired and config is not None:
            self.rules.retired = retired
            if self.mode == Mode.PASSTHROUGH:
                await self.rules.update(config, "server_drained")
        in_use = {s for w in self.workers if w is not None for s in w.in_use}
        if in_use != self.rules.in_use and config is not None:
            self.rules.in_use = in_use
            if self.rules.new_plan(config):
                await self._ask_all(("plan", self.rules.plan))
                await self.rules.update(config, "server_drained")

    async def snapshot(self, base: dict[str, Any]) -> dict[str, Any]:
        """/stats: ``base`` (the supervisor's own document) with every worker's counters, fresh."""
        await self.refresh()
        live = [w.last_doc for w in self.workers if w is not None and w.last_doc is not None]
        return merge(base, live, self.dead_docs, self.section())

    def section(self) -> list[dict[str, Any]]:
        """The per-worker list of /stats ``workers``."""
        entries = []
        config = self.config
        ranges = return_port_ranges(config, self.count) if config and self.mode == Mode.PASSTHROUGH else None
        for index in range(self.count):
            handle = self.workers[index] if index < len(self.workers) else None
            info: dict[str, Any] = {"index": index, "alive": handle is not None and handle.alive}
            if handle is not None:
                info.update(pid=handle.proc.pid, restarts=handle.restarts)
            if self.mode != Mode.PROXY and config is not None:
                pt = self.mode == Mode.PASSTHROUGH
                info["queue"] = (config.passthrough.queue_num if pt else config.dsr.queue_num) + index
            if ranges is not None:
                info["port_range"] = f"{ranges[index][0]}-{ranges[index][1]}"
            entries.append(worker_entry(info, handle.last_doc if handle is not None else None))
        return entries


def _wait_ready(conn: Connection, timeout: float) -> tuple[Any, ...]:
    if not conn.poll(timeout):
        raise StartupError(f"a worker did not start within {timeout:g}s")
    try:
        answer: tuple[Any, ...] = conn.recv()
    except EOFError:
        return ("failed", "it exited at start (its log lines above say why)")
    return answer


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
