"""Where the runtime API finds the live state of one engine: its pools, config and data plane, on its loop.

The engine's state belongs to its asyncio loop; the stats service answers from a thread of its own, so every read
and change goes through :func:`on_loop` (one consistent state, no lock). The supervisor of several workers can
build other :class:`convey.control.api.Sources` (chaining the workers' flows) without touching the API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from convey.balancing.pool import Pool
from convey.config import Config
from convey.control.api import Control, Sources
from convey.control.flows import Query, Selection
from convey.control.overlay import overlay_section
from convey.stats import Stats

__all__ = ["EngineLike", "engine_control", "on_loop"]


class EngineLike(Protocol):
    @property
    def mode(self) -> str: ...
    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def config(self) -> Config: ...
    @property
    def plane(self) -> Any: ...  # a data plane: GET /flows uses its ``flows()`` when it has one
    @property
    def stats(self) -> Stats: ...


def on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """``fn()`` run on ``loop`` (directly when there is no running loop), from another thread: its result or its
    exception."""
    if loop is None or loop.is_closed() or not loop.is_running():
        return fn()
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller's thread
            future.set_exception(exc)

    loop.call_soon_threadsafe(call)
    return future.result(timeout)


def _flows(engine: EngineLike, query: Query) -> Selection:
    flows = getattr(engine.plane, "flows", None)
    return flows(query) if callable(flows) else ([], 0)


def engine_control(engine: EngineLike, loop: Callable[[], asyncio.AbstractEventLoop | None]) -> Control:
    """The API over one engine whose loop ``loop()`` gives; shows the runtime overlay in /stats ("runtime")."""
    engine.stats.sections["runtime"] = lambda: overlay_section(engine.pools)
    return Control(
        Sources(
            mode=str(engine.mode),
            pools=lambda: engine.pools,
            config=lambda: engine.config,
            flows=lambda query: _flows(engine, query),
            run=lambda fn: on_loop(loop(), fn),
        )
    )
