"""End-to-end fixtures: real `convey` processes and real test HTTP servers on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# CONVEY_TEST_WORKERS=N: every convey started here runs N worker processes (make test-workers)
WORKERS = [f"--workers={os.environ['CONVEY_TEST_WORKERS']}"] if os.environ.get("CONVEY_TEST_WORKERS") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the condition may fail while things start
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


class HttpServer:
    """testbed/httpd.py on 127.0.0.1, in its own process."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> HttpServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.httpd", "--bind", self.addr, "--name", self.name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "READY" in line, f"test server {self.name} did not start: {line!r}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class Convey:
    """A real `convey` process."""

    def __init__(self, config: Path, args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.args = args
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Convey:
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convey",
                f"--config={self.config}",
                "--log-level=DEBUG",
                *WORKERS,
                *self.args,
            ],
            cwd=ROOT,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )
        return self

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.logs(), timeout, f"{text!r} in convey's log:\n{self.logs()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        rc = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    rc = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                    raise AssertionError(
                        f"convey did not stop within {timeout}s:\n{self.logs()[-3000:]}"
                    ) from None
            else:
                rc = self.proc.returncode
        self.proc = None
        with contextlib.suppress(AttributeError):
            self._logf.close()
        return rc


def http_get(addr: str, path: str = "/", timeout: float = 5.0) -> str:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), raw[:200]
    return body.decode()


def who(addr: str) -> str:
    """Which test server answered (its name)."""
    return http_get(addr).split()[0]


def stats(port: int, path: str = "/stats") -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        body = resp.read().decode()
    return json.loads(body) if path == "/stats" else body


@pytest.fixture
def servers() -> Iterator[Callable[..., HttpServer]]:
    started: list[HttpServer] = []

    def make(name: str, port: int | None = None) -> HttpServer:
        server = HttpServer(name, port).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def convey_proc() -> Iterator[Callable[..., Convey]]:
    started: list[Convey] = []

    def make(config: Path, *args: str) -> Convey:
        proc = Convey(config, args).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        with contextlib.suppress(AssertionError):
            proc.stop(signal.SIGKILL if os.environ.get("CONVEY_FAST_KILL") else signal.SIGTERM)
