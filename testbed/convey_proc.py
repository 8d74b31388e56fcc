"""Run the real ``convey`` process inside a test bed's balancer namespace (root only).

    with ConveyProcess(bed, bed.config_toml("passthrough", extra=...), mode="passthrough") as lb:
        body = bed.client.curl(f"http://{bed.vip}/")
        doc = lb.stats()

``start`` writes the config into the bed's log directory, starts ``python -m convey --passthrough
--config=F --install-rules`` in ``bed.lb``'s namespace and waits until its ``/stats`` answers with the packet
section showing the queue bound (polled through a socket made in that namespace; never a fixed sleep). ``stop``
sends SIGTERM, waits for the exit (so convey removes the rules it installed) and returns the log. The bed kills
the process on destroy in any case, and ``__exit__`` always stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.bed import Testbed
from testbed.process import TestbedError, python_env, stop_process, wait_until

STATS_PORT = 7000
MODE_FLAGS = {"passthrough": "--passthrough", "dsr": "--dsr", "proxy": None}


class ConveyProcessError(TestbedError):
    """convey did not start, or exited badly; the message carries the end of its log."""


class ConveyProcess:
    def __init__(
        self,
        bed: Testbed,
        config_text: str,
        mode: str = "passthrough",
        *,
        install_rules: bool = True,
        stats_port: int = STATS_PORT,
        log_level: str = "INFO",
        name: str = "convey",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        if "[stats]" not in config_text:
            config_text += f'\n[stats]\nport = {stats_port}\naddress = "127.0.0.1"\n'
        self.bed = bed
        self.mode = mode
        self.stats_port = stats_port
        self.config_path = bed.logdir / f"{name}.toml"
        self.log_path = bed.logdir / f"{name}.log"
        self.config_path.write_text(config_text)
        self.install_rules = install_rules
        self.log_level = log_level
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    # lifecycle

    def start(self, timeout: float = 20.0) -> ConveyProcess:
        argv = [
            sys.executable,
            "-m",
            "convey",
            f"--config={self.config_path}",
            f"--log-level={self.log_level}",
        ]
        flag = MODE_FLAGS[self.mode]
        if flag:
            argv.append(flag)
        if self.install_rules and self.mode != "proxy":
            argv.append("--install-rules")
        with self.log_path.open("wb") as log:
            self.proc = self.bed.lb.popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=python_env() | self.extra_env
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                status = self.proc.returncode
                self.proc = None
                raise ConveyProcessError(
                    f"convey exited with status {status} at start:\n{self.log()[-4000:]}"
                )
            try:
                if self._ready():
                    return self
            except (OSError, ValueError) as exc:  # not listening yet, or a partial answer
                last = exc
            if time.monotonic() > deadline:
                self.kill()
                raise ConveyProcessError(
                    f"convey's /stats did not show the data plane running within {timeout:g}s "
                    f"(last error: {last!r})\n--- log ---\n{self.log()[-4000:]}"
                )
            time.sleep(0.05)  # poll interval, not synchronisation

    def _ready(self) -> bool:
        doc = self.stats(timeout=2.0)
        if self.mode == "proxy":
            return True
        return doc.get("packet", {}).get("queue", {}).get("num") is not None

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM, wait for a clean exit (which removes the rules convey installed); returns the log.
        Raises ConveyProcessError when it does not exit in time or exits with an error status."""
        proc = self.proc
        if proc is None:
            return self.log()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ConveyProcessError(
                    f"convey did not exit within {timeout:g}s of SIGTERM:\n{self.log()[-4000:]}"
                ) from None
        self.proc = None
        if proc.returncode != 0:
            raise ConveyProcessError(f"convey exited with status {proc.returncode}:\n{self.log()[-4000:]}")
        return self.log()

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ConveyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # observation

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The /stats document, fetched through a socket made in the balancer's namespace."""
        with self.bed.lb.connect("127.0.0.1", self.stats_port, timeout) as sock:
            sock.sendall(b"GET /stats HTTP/1.0\r\nHost: convey\r\n\r\n")
            chunks = []
            deadline = time.monotonic() + timeout
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError("/stats took too long")
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise OSError(f"/stats answered {status!r}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def wait_stats(self, condition: Any, timeout: float, what: str) -> dict[str, Any]:
        """Poll /stats until ``condition(doc)`` is truthy; returns that document (TestbedError on timeout)."""
        found: dict[str, Any] = {}

        def check() -> bool:
            doc = self.stats()
            if condition(doc):
                found.update(doc)
                return True
            found.clear()
            found["last"] = doc
            return False

        try:
            wait_until(check, timeout, what, interval=0.05)
        except TestbedError as exc:
            raise TestbedError(f"{exc}; last /stats: {json.dumps(found.get('last'))[:3000]}") from None
        return found

    def write_config(self, text: str) -> None:
        """Replace the config file atomically (the running convey notices and reloads)."""
        if "[stats]" not in text:
            text += f'\n[stats]\nport = {self.stats_port}\naddress = "127.0.0.1"\n'
        tmp = Path(str(self.config_path) + ".new")
        tmp.write_text(text)
        tmp.replace(self.config_path)
