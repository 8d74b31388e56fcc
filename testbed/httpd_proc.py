"""Start the test HTTP server (:mod:`testbed.httpd`) in a host of the bed and wait until it listens."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed.host import Host
from testbed.process import TestbedError, python_env, read_line, stop_process


@dataclass
class HttpServer:
    """testbed/httpd.py running in a host of the bed."""

    host: Host
    proc: subprocess.Popen[bytes]
    name: str
    addr: str
    port: int
    log: Path

    def url(self, path: str = "/") -> str:
        return f"http://{self.addr}:{self.port}{path}"

    def stop(self) -> None:
        stop_process(self.proc)

    def errors(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_httpd(
    host: Host, port: int = 8080, name: str | None = None, bind: str | None = None, timeout: float = 10.0
) -> HttpServer:
    """Start the test HTTP server in ``host`` on ``bind`` (default: the host's address):``port`` and wait
    (at most ``timeout`` s) until it prints READY."""
    name = name or host.role
    bind = bind or host.addr
    logdir = host.bed.logdir if host.bed is not None else Path(tempfile.gettempdir())
    log = logdir / f"httpd-{host.role}-{port}.log"
    with log.open("wb") as err:
        proc = host.popen(
            [sys.executable, "-m", "testbed.httpd", "--bind", f"{bind}:{port}", "--name", name],
            stdout=subprocess.PIPE,
            stderr=err,
            env=python_env(),
        )
    try:
        line = read_line(proc, timeout)
        if not line.startswith("READY"):
            raise TestbedError(f"httpd in {host.ns} did not start: {line!r}")
    except BaseException as exc:
        stop_process(proc)
        text = log.read_text(errors="replace").strip()
        if isinstance(exc, TestbedError):
            raise TestbedError(f"{exc}; stderr: {text[-2000:]}") from None
        raise
    bound = line.split()[1] if len(line.split()) > 1 else f"{bind}:{port}"
    addr, _, real_port = bound.rpartition(":")
    return HttpServer(host, proc, name, addr, int(real_port), log)
