"""Processes started for a test bed: waiting for conditions and lines, stopping process groups, the environment
that makes the repository importable in a child (``python -m testbed.httpd``, ``python -m convey``, bench roles)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class TestbedError(Exception):
    """The bed could not be built, or a command in it failed."""

    __test__ = False  # not a pytest test class


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy (returned); TestbedError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            raise TestbedError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def python_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default, or empty: this process's environment) with the repository first on
    PYTHONPATH."""
    env = dict(base or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One line from ``proc``'s stdout pipe, waiting at most ``timeout`` seconds (no blocking readline)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TestbedError(f"no line from {proc.args!r} within {timeout:g}s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise TestbedError(f"{proc.args!r} exited (status {proc.wait(5)}) before printing a line")
            data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def stop_process(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap it, close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    else:  # the leader is gone, its group may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
