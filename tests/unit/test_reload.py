"""Live reload survives anything (issue 10, defect 3): an exception while loading or applying a config is logged
(``event=reload_error``), counted in /stats (``reload_errors``, ``last_reload_error``), and the watcher keeps
watching, so a later good edit and SIGHUP still apply."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convey import reload as reload_mod
from convey.config import Config, ConfigError, parse_config
from convey.engine import Engine
from convey.reload import ConfigWatcher
from convey.stats import snapshot

CONFIG = """
[frontends.f]
listen_addr = "127.0.0.1:{port}"
backend = "b"
[backends.b]
[backends.b.servers.s1]
addr = "127.0.0.1:9001"
weight = {weight}
"""


def write(path: Path, weight: int, port: int = 18080) -> None:
    path.write_text(CONFIG.format(weight=weight, port=port))


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weights(applied: list[Config]) -> list[int]:
    return [c.backends["b"].servers[0].weight for c in applied]


class Watched:
    """A watcher on ``path`` recording what it applies and the errors it reports."""

    def __init__(self, path: Path, apply: Callable[[Config], None] | None = None) -> None:
        self.applied: list[Config] = []
        self.errors: list[Exception] = []
        self.watcher = ConfigWatcher(
            path, apply or self.applied.append, self.errors.append, poll_interval=0.02
        )


def test_the_watcher_survives_a_loader_that_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.toml"
    write(path, 1)
    real = reload_mod.load_config
    calls = {"n": 0}

    def raise_once(p: Any) -> Config:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("parser blew up")
        return real(p)

    monkeypatch.setattr(reload_mod, "load_config", raise_once)

    async def scenario() -> Watched:
        w = Watched(path)
        w.watcher.start()
        try:
            write(path, 2)
            await until(lambda: w.errors, "the error to be reported")
            assert w.applied == []
            write(path, 3, port=18081)  # a later good edit applies
            await until(lambda: w.applied, "the good edit")
            w.watcher.request_reload()  # and SIGHUP still works
            await until(lambda: len(w.applied) == 2, "the SIGHUP reload")
        finally:
            await w.watcher.stop()
        return w

    with caplog.at_level(logging.ERROR, logger="convey.reload"):
        w = asyncio.run(scenario())
    assert weights(w.applied) == [3, 3]
    assert len(w.errors) == 1 and isinstance(w.errors[0], RuntimeError)
    assert any("event=reload_error" in r.message and "parser blew up" in r.message for r in caplog.records)


def test_the_watcher_survives_an_apply_that_raises(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    write(path, 1)
    seen: list[Config] = []

    def apply(config: Config) -> None:
        seen.append(config)
        if len(seen) == 1:
            raise ValueError("apply failed")

    async def scenario() -> Watched:
        w = Watched(path, apply)
        w.watcher.start()
        try:
            w.watcher.request_reload()
            await until(lambda: w.errors, "the failed apply")
            write(path, 4, port=18082)
            await until(lambda: len(seen) == 2, "the next edit")
        finally:
            await w.watcher.stop()
        return w

    w = asyncio.run(scenario())
    assert weights(seen) == [1, 4]
    assert [type(e) for e in w.errors] == [ValueError]


def test_a_bad_file_is_still_a_rejection_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    write(path, 1)

    async def scenario() -> Watched:
        w = Watched(path)
        w.watcher.start()
        try:
            path.write_text(CONFIG.format(weight=-1, port=1))
            await until(lambda: w.errors, "the rejection")
        finally:
            await w.watcher.stop()
        return w

    w = asyncio.run(scenario())
    assert isinstance(w.errors[0], ConfigError) and "weight" in str(w.errors[0])


def test_engine_counts_reload_errors_and_applies_the_next_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.toml"
    write(path, 1)
    engine = Engine(parse_config(path.read_text(), str(path)), "proxy", watch=False)
    real_apply = engine.plane.apply
    calls = {"n": 0}

    async def apply_raising_once(config: Config) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("plane exploded")
        return await real_apply(config)

    engine.plane.apply = apply_raising_once  # type: ignore[method-assign]

    async def scenario() -> None:
        port = free_port()
        await engine._apply(parse_config(CONFIG.format(weight=2, port=port), str(path)))
        await engine._apply(parse_config(CONFIG.format(weight=5, port=port), str(path)))
        await engine.plane.stop(0)

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    doc = snapshot(engine.stats, engine.pools, {}, time.time())
    assert doc["reload_errors"] == 1
    assert doc["reloads"] == 1 and doc["reload_failures"] == 0
    assert doc["last_reload_error"] is None  # cleared by the good reload after it
    assert engine.pools["b"].servers["s1"].weight == 5
    assert any("event=reload_error" in r.message and "plane exploded" in r.message for r in caplog.records)


def test_engine_reports_the_last_reload_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    write(path, 1)
    engine = Engine(parse_config(path.read_text(), str(path)), "proxy", watch=False)

    async def boom(config: Config) -> list[str]:
        raise OSError(24, "Too many open files")

    engine.plane.apply = boom  # type: ignore[method-assign]
    asyncio.run(engine._apply(parse_config(CONFIG.format(weight=2, port=free_port()), str(path))))
    doc = snapshot(engine.stats, engine.pools, {}, time.time())
    assert doc["reload_errors"] == 1
    assert "Too many open files" in doc["last_reload_error"]
