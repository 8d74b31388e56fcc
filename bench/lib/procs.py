"""Starting roles (bench/lib/roles.py) and talking to them: in a test bed's namespace (:func:`spawn_in`) or on this
host (:class:`Children`), a question on stdin and its one-line answer (:func:`ask`), the JSON line a role prints at
its end (:func:`result_of`), and stopping them whatever happens."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.process import REPO_ROOT, python_env, read_line

if TYPE_CHECKING:
    from testbed.host import Host


def role_argv(role: str, *args: Any) -> list[str]:
    """The command line that runs ``role`` with ``args`` (cwd and PYTHONPATH: the repository)."""
    return [sys.executable, "-m", "bench.lib.roles", role, *map(str, args)]


def spawn_in(
    host: Host, role: str, *args: Any, ready: bool = True, stdin: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``role`` in ``host``'s namespace (the bed kills it on destroy); with ``ready``, wait (bounded) for
    its ``ready`` line. ``stdin``: a pipe to talk to it (:func:`ask`), else /dev/null."""
    proc: subprocess.Popen[bytes] = host.popen(
        role_argv(role, *args),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_env(),
    )
    if ready:
        line = read_line(proc, 20)
        if line != "ready":
            raise RuntimeError(f"{role} did not start: {line!r}")
    return proc


def ask(proc: subprocess.Popen[bytes], line: str, timeout: float) -> str:
    """Write ``line`` to the role's stdin and return the line it answers (waiting at most ``timeout`` s)."""
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return read_line(proc, timeout)


def result_of(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The JSON line a role prints at its end (RuntimeError if it fails or takes longer than ``timeout``)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{proc.args!r} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"{proc.args!r} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """End a child: EOF on its stdin (roles that read it finish), then SIGTERM, then SIGKILL."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Children:
    """Every process a benchmark started on this host, so that all of them are stopped whatever happens (they
    also get PR_SET_PDEATHSIG: they die if the benchmark is killed outright)."""

    logdir: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)

    def start(
        self, args: list[str], pin: str | None = None, wait_ready: bool = False
    ) -> subprocess.Popen[str]:
        """Start ``args`` (on the CPUs ``pin`` names, taskset syntax); with ``wait_ready``, read its ``ready``."""
        if pin is not None and shutil.which("taskset"):
            args = ["taskset", "-c", pin, *args]
        # stderr goes to a file: a chatty child must never block on a full pipe nobody reads.
        log = Path(self.logdir) / f"child-{len(self.logs)}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO_ROOT,
                env=python_env(),
                start_new_session=True,  # Ctrl-C goes to us only; we stop the children in order
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        if wait_ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{' '.join(args)} did not start: {line!r} {self.stderr(proc)}")
        return proc

    def role(
        self, role: str, *args: Any, pin: str | None = None, wait_ready: bool = True
    ) -> subprocess.Popen[str]:
        """Start one of bench/lib/roles.py's roles."""
        return self.start(role_argv(role, *args), pin=pin, wait_ready=wait_ready)

    def stderr(self, proc: subprocess.Popen[str]) -> str:
        log = self.logs.get(proc.pid)
        return log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""

    def stop(self, proc: subprocess.Popen[str], timeout: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def collect(self, procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
        """Wait for load generators and return the JSON line each prints at its end; stop them whatever happens."""
        results = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"load generator failed ({proc.returncode}): {self.stderr(proc)}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                self.stop(proc)
        return results


def interrupt_on_sigterm() -> None:
    """SIGTERM cleans up as Ctrl-C does (a KeyboardInterrupt in this process). A process forked from this one
    (pyroute2 forks helpers for its namespace work, and they inherit the handler) just exits: raising there
    would run the script's cleanup, the bed's destruction included, in the helper."""
    main_pid = os.getpid()

    def on_term(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
