"""Proxy limits without a network: the config keys, the open-file limit, local resource errors in health checks,
and the acceptor's pause and back-off when descriptors run out (issue 10, defect 1)."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from convey.balancing.pool import Pool
from convey.config import ConfigError, parse_config
from convey.health import HealthChecker
from convey.proxy import accept, resources
from convey.proxy.accept import Acceptor
from convey.stats import Stats

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[frontends.web]
listen_addr = "127.0.0.1:8080"
backend = "app"
{front}
[backends.app]
{back}
[backends.app.servers.a]
addr = "127.0.0.1:9001"
"""


def parse(front: str = "", back: str = "") -> Any:
    return parse_config(BASE.format(front=front, back=back), "limits.toml")


# -- config -------------------------------------------------------------------------------------------------------


def test_defaults_keep_existing_configs_working() -> None:
    config = parse()
    front = config.frontends["web"]
    assert (front.idle_timeout, front.max_connections, front.tcp_keepalive) == (300.0, 0, False)
    assert config.backends["app"].connect_timeout == 3.0


def test_keys_are_read() -> None:
    config = parse("idle_timeout = 30\nmax_connections = 5000\ntcp_keepalive = true", "connect_timeout = 0.5")
    front = config.frontends["web"]
    assert (front.idle_timeout, front.max_connections, front.tcp_keepalive) == (30.0, 5000, True)
    assert config.backends["app"].connect_timeout == 0.5
    assert parse("idle_timeout = 0").frontends["web"].idle_timeout == 0.0  # 0: never


@pytest.mark.parametrize(
    ("front", "back", "key", "problem"),
    [
        ("idle_timeout = -1", "", "frontends.web.idle_timeout", "between 0 and"),
        ('idle_timeout = "5m"', "", "frontends.web.idle_timeout", "number of seconds"),
        ("idle_timeout = nan", "", "frontends.web.idle_timeout", "number of seconds"),
        ("idle_timeout = 1e12", "", "frontends.web.idle_timeout", "between 0 and"),
        ("max_connections = -1", "", "frontends.web.max_connections", "between 0 and"),
        ("max_connections = 1.5", "", "frontends.web.max_connections", "integer"),
        ("max_connections = true", "", "frontends.web.max_connections", "integer"),
        ("tcp_keepalive = 1", "", "frontends.web.tcp_keepalive", "true or false"),
        ("", "connect_timeout = 0", "backends.app.connect_timeout", "greater than 0"),
        ("", "connect_timeout = 7200", "backends.app.connect_timeout", "at most 3600"),
        ("", 'connect_timeout = "3s"', "backends.app.connect_timeout", "number of seconds"),
        ("connect_timeout = 3", "", "frontends.web.connect_timeout", "unknown key"),
    ],
)
def test_bad_values_name_file_and_key(front: str, back: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(front, back)
    assert info.value.file == "limits.toml"
    assert info.value.key == key
    assert problem in info.value.problem


def test_sample_proxy_config_documents_the_keys() -> None:
    text = (ROOT / "samples" / "sample-proxy.toml").read_text()
    for key in ("idle_timeout", "max_connections", "tcp_keepalive", "connect_timeout"):
        assert key in text, key
    parse_config(text, "sample-proxy.toml")  # and it still loads


# -- the open-file limit ------------------------------------------------------------------------------------------


def test_raise_nofile_limit_goes_to_the_hard_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = {"now": (1024, 65536)}
    monkeypatch.setattr(resources.resource, "getrlimit", lambda _what: limits["now"])
    monkeypatch.setattr(resources.resource, "setrlimit", lambda _what, value: limits.update(now=value))
    with caplog.at_level(logging.INFO, logger="convey.resources"):
        assert resources.raise_nofile_limit() == (65536, 65536)
    assert limits["now"] == (65536, 65536)
    assert "event=nofile_limit soft=65536 hard=65536" in caplog.text


def test_raise_nofile_limit_unlimited_hard_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (1024, resource.RLIM_INFINITY)}
    monkeypatch.setattr(resources.resource, "getrlimit", lambda _what: limits["now"])
    monkeypatch.setattr(resources.resource, "setrlimit", lambda _what, value: limits.update(now=value))
    soft, _ = resources.raise_nofile_limit()
    assert 1024 < soft <= resources.NOFILE_CAP
    assert limits["now"] == (soft, resource.RLIM_INFINITY)


def test_raise_nofile_limit_in_a_real_process() -> None:
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))\n"
        "from convey.proxy.resources import raise_nofile_limit\n"
        "raise_nofile_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "(200, 200)"


@pytest.mark.parametrize(
    "code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL]
)
def test_local_errors(code: int) -> None:
    assert resources.is_local_error(OSError(code, "x"))


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.ECONNRESET])
def test_server_errors_are_not_local(code: int) -> None:
    assert not resources.is_local_error(OSError(code, "x"))
    assert not resources.is_local_error(TimeoutError())


# -- health checks ------------------------------------------------------------------------------------------------


def test_health_local_error_is_not_held_against_the_server(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE while checking: the server keeps its state, no failed check is recorded, local_errors counts."""
    config = parse(back="fall = 1\nrise = 1")
    pool = Pool(config.backends["app"], "proxy")
    stats = Stats("proxy", 0.0)
    changes: list[bool] = []
    checker = HealthChecker({"app": pool}, on_change=lambda _p, _s, up: changes.append(up), stats=stats)

    async def out_of_descriptors(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(asyncio, "open_connection", out_of_descriptors)

    async def rounds() -> None:
        for _ in range(5):
            await checker.check_pool(pool)

    with caplog.at_level(logging.WARNING, logger="convey.health"):
        asyncio.run(rounds())
    server = pool.servers["a"]
    assert server.healthy and server.state == "up"
    assert server.health.checks_failed == 0 and server.health.last_error is None
    assert changes == []
    assert stats.sections["health"]() == {"local_errors": 5}
    assert caplog.text.count("event=health_local_error") == 1  # rate-limited


def test_health_server_error_still_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse(back="fall = 1\nrise = 1")
    pool = Pool(config.backends["app"], "proxy")
    checker = HealthChecker({"app": pool})

    async def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(asyncio, "open_connection", refused)
    asyncio.run(checker.check_pool(pool))
    assert not pool.servers["a"].healthy
    assert checker.local_errors == 0


# -- the acceptor -------------------------------------------------------------------------------------------------


class _ScriptedListener:
    """Stands for a listening socket: readable (a socketpair end with a byte in it), accept() as scripted."""

    def __init__(self, errors: list[int | None]) -> None:
        self._pair = socket.socketpair()
        self._pair[1].send(b"!")
        self.errors = errors
        self.calls: list[float] = []

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def accept(self) -> tuple[socket.socket, object]:
        self.calls.append(time.monotonic())
        code = self.errors.pop(0) if self.errors else errno.EMFILE
        if code is None:
            raise BlockingIOError(errno.EAGAIN, "again")
        raise OSError(code, "Too many open files")

    def close(self) -> None:
        for s in self._pair:
            s.close()


def test_acceptor_pauses_with_backoff_instead_of_spinning(caplog: pytest.LogCaptureFixture) -> None:
    """Accept keeps failing with EMFILE: accept is retried after 0.1, 0.2, 0.4, 0.8, 1 s, ... not in a loop."""
    listener = _ScriptedListener([])

    async def main() -> Acceptor:
        acceptor = Acceptor(asyncio.get_running_loop(), listener, lambda _c, _a: None, "web")  # type: ignore[arg-type]
        acceptor.start()
        started = time.monotonic()
        while len(listener.calls) < 5:
            assert time.monotonic() - started < 5, listener.calls
            await asyncio.sleep(0.01)
        acceptor.stop()
        return acceptor

    with caplog.at_level(logging.WARNING, logger="convey.proxy.accept"):
        acceptor = asyncio.run(main())
    listener.close()
    gaps = [b - a for a, b in zip(listener.calls, listener.calls[1:], strict=False)]
    assert [round(g, 1) for g in gaps] == pytest.approx([0.1, 0.2, 0.4, 0.8], abs=0.1), gaps
    assert acceptor.pauses == 5
    assert caplog.text.count("event=accept_paused") == 1  # rate-limited


def test_acceptor_hands_over_clients() -> None:
    """Real clients reach on_client; nothing pauses."""

    async def main() -> list[object]:
        got: list[object] = []
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.setblocking(False)
        acceptor = Acceptor(asyncio.get_running_loop(), server, lambda c, a: got.append((c.close(), a)), "w")
        acceptor.start()
        clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
        started = time.monotonic()
        while len(got) < 3:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.01)
        acceptor.stop()
        for c in clients:
            c.close()
        server.close()
        assert acceptor.pauses == 0
        return got

    assert len(asyncio.run(main())) == 3


def test_backoff_constants_are_sane() -> None:
    assert 0.05 <= accept.MIN_PAUSE < accept.MAX_PAUSE <= 1.0
