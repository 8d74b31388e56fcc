"""convey.systemd: sd_notify datagrams on a real AF_UNIX socket (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from convey import systemd


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_ready_reloading_stopping(
    notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.ready()
    assert sock.recv(4096) == b"READY=1"
    assert systemd.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert systemd.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1][15:]) > 0
    assert systemd.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace() -> None:
    name = f"convey-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_nothing_to_do_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.ready()
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})  # not a unix socket: ignored


def test_a_failed_send_is_never_raised(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": "@convey-test-nobody-listens"})
