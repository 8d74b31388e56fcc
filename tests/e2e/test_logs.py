"""The real `convey` with --log-format=json, [log] connections = true and NOTIFY_SOCKET: every line is one JSON
object with ts/level/logger/event, each listener is logged once, a connection's close line, rate-limited failed
connects, and the sd_notify datagrams (READY=1, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1)."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import WORKERS, Convey, HttpServer, free_port, wait_for, who


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def lines(lb: Convey) -> list[dict[str, Any]]:
    out = []
    for line in lb.logs().splitlines():
        doc = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "logger", "event"} <= set(doc), line
        out.append(doc)
    return out


def events(lb: Convey, event: str) -> list[dict[str, Any]]:
    return [doc for doc in lines(lb) if doc["event"] == event]


def test_json_lines_connection_line_and_sd_notify(
    tmp_path: Path,
    servers: Callable[..., HttpServer],
    convey_proc: Callable[..., Convey],
    notify: socket.socket,
) -> None:
    a = servers("a")
    vip, dead, stats_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    dead_server = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = tmp_path / "convey.toml"
    config.write_text(
        f"""
[frontends.web]
listen_addr = "{vip}"
backend = "pool"
[frontends.dead]
listen_addr = "{dead}"
backend = "gone"
[backends.pool]
health_check_interval = 60
[backends.pool.servers.a]
addr = "{a.addr}"
[backends.gone]
health_check_interval = 60
[backends.gone.servers.x]
addr = "{dead_server}"
[stats]
port = {stats_port}
[log]
connections = true
"""
    )
    lb = convey_proc(config, "--log-format=json")
    assert notify.recv(4096) == b"READY=1"  # sent once listening and serving /stats
    assert events(lb, "started")
    listening = events(lb, "listening")
    per_process = int(WORKERS[0].split("=")[1]) if WORKERS else 1  # with workers: once in each worker
    assert sorted(doc["frontend"] for doc in listening) == ["dead"] * per_process + ["web"] * per_process

    assert who(vip) == "a"
    conn = wait_for(lambda: events(lb, "connection"), 10, "the connection line")[0]
    assert conn["logger"] == "convey.connections" and conn["level"] == "info"
    assert (conn["frontend"], conn["backend"], conn["server"], conn["end"]) == ("web", "pool", "a", "closed")
    assert conn["client"].startswith("127.0.0.1:") and conn["bytes_tx"] > 0 and conn["bytes_rx"] > 0
    assert isinstance(conn["duration"], float | int) and conn["duration"] >= 0

    host, port = dead.split(":")
    for _ in range(3):  # the server is down: connects fail, logged once per 10 s, every client counted
        with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(5)
            if not s.recv(1):  # reset by convey (on loopback, maybe before connect() returns)
                raise ConnectionResetError
    wait_for(lambda: len(events(lb, "connection")) == 4, 10, "three more connection lines")
    failed = events(lb, "connect_failed")
    # rate-limited per process: once, or once in each worker that met it
    assert 1 <= len(failed) <= per_process and failed[0]["level"] == "warning" and failed[0]["server"] == "x"
    refused = events(lb, "refused")
    assert 1 <= len(refused) <= per_process and refused[0]["reason"] == "all_failed"
    assert [doc["end"] for doc in events(lb, "connection")[1:]] == ["connect_failed"] * 3

    assert lb.proc is not None
    lb.proc.send_signal(signal.SIGHUP)
    assert notify.recv(4096).split(b"\n")[0] == b"RELOADING=1"
    assert notify.recv(4096) == b"READY=1"
    assert lb.stop() == 0
    assert notify.recv(4096) == b"STOPPING=1"
    assert events(lb, "stopped")
