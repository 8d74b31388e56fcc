"""BIRD 2 as convey's child: foreground, its own config and control socket in a private runtime directory, and
bound to die with convey.

``PR_SET_PDEATHSIG`` (set in the child between fork and exec) has the kernel SIGKILL BIRD as soon as the thread
that started it ends, so a convey killed with SIGKILL leaves no speaker behind: BIRD's BGP sockets close, the
router ends the sessions and drops the routes at once (graceful restart is off, see bird_config.py). The signal
is tied to the *thread* that forked: start the speaker from the event loop's thread, never from a worker thread.
BIRD's log lines (stderr) are relayed to convey's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from convey.bgp import birdctl
from convey.errors import StartupError

log = logging.getLogger("convey.bgp")

PR_SET_PDEATHSIG = 1
PACKAGE_HINT = "install BIRD 2: apt-get install bird2 (Debian/Ubuntu package bird2)"
RUNTIME_PREFIX = "convey-bird-"
_LOUD = ("<WARN>", "<ERR>", "<AUTH>", "<FATAL>", "<BUG>", "<RMT>")


def find_bird(binary: str | None = None) -> str:
    """The path of the ``bird`` daemon (``binary``, else on PATH or in /usr/sbin); StartupError naming the
    package when it is missing."""
    for candidate in (binary,) if binary else ("bird", "/usr/sbin/bird", "/usr/local/sbin/bird"):
        path = shutil.which(candidate)
        if path:
            return path
    raise StartupError(
        f"[bgp] needs the BIRD routing daemon, and {binary or 'bird'} is not found: {PACKAGE_HINT}"
    )


def die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when its parent (thread) ends; it exits at once if that happened
    already. libc is loaded here, before the fork."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)

    return setup


def _runtime_base() -> str:
    return "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()


def remove_stale_runtime_dirs(base: str | None = None) -> list[str]:
    """Runtime directories of convey processes that no longer exist (a SIGKILLed convey leaves its own)."""
    removed = []
    base_dir = Path(base or _runtime_base())
    for path in base_dir.glob(f"{RUNTIME_PREFIX}*"):
        pid_text = path.name[len(RUNTIME_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
    return removed


class BirdSpeaker:
    """One BIRD process: ``start(conf)``, ``configure(conf)``, ``alive``, ``stop()``."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = find_bird(binary)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: Path | None = None
        self.version = ""
        self._partial = b""
        self._reader_fd: int | None = None

    @property
    def socket_path(self) -> str:
        assert self.runtime is not None
        return str(self.runtime / "bird.ctl")

    @property
    def conf_path(self) -> Path:
        assert self.runtime is not None
        return self.runtime / "bird.conf"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, conf: str) -> None:
        """Write ``conf``, check it (``bird -p``) and start BIRD; call from the event loop's thread."""
        if self.runtime is None:
            remove_stale_runtime_dirs()
            self.runtime = Path(
                tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{os.getpid()}-", dir=_runtime_base())
            )
        self._write(conf)
        check = subprocess.run(
            [self.binary, "-p", "-c", str(self.conf_path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check.returncode != 0:
            raise StartupError(
                f"BIRD refused the config convey wrote: {(check.stderr or check.stdout).strip()}"
            )
        argv = [
            self.binary,
            "-f",
            "-c",
            str(self.conf_path),
            "-s",
            self.socket_path,
            "-P",
            str(self.runtime / "pid"),
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(os.getpid()),  # prctl between fork and exec: the point of it
            close_fds=True,
            # Its own session: a signal to convey's process group (Ctrl-C, kill -- -PGID) must not stop BIRD
            # before convey has withdrawn the routes through it.
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._relay, fd)
        self._reader_fd = fd
        log.info(
            "event=speaker_started pid=%d binary=%s runtime=%s", self.proc.pid, self.binary, self.runtime
        )

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the control socket answers; StartupError when BIRD exits or stays silent."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise StartupError(f"BIRD exited at start (status {self.proc and self.proc.returncode})")
            try:
                reply = await birdctl.command(self.socket_path, "show status", timeout=1.0)
                self.version = next((text for code, text in reply if code == 1000), "")
                return
            except (OSError, TimeoutError, birdctl.BirdError):
                if time.monotonic() > deadline:
                    raise StartupError(f"BIRD's control socket did not answer within {timeout:g}s") from None
            await asyncio.sleep(0.05)  # poll interval, not synchronisation

    async def configure(self, conf: str) -> None:
        """Rewrite the config and have BIRD apply it (sessions of unchanged peers stay up)."""
        self._write(conf)
        reply = await birdctl.command(self.socket_path, "configure")
        if not any(code in birdctl.CONFIGURED for code, _ in reply):
            raise birdctl.BirdError(f"bird: configure: {reply[-1][1] if reply else 'no reply'}")

    async def query(self, text: str) -> birdctl.Reply:
        return await birdctl.command(self.socket_path, text, timeout=2.0)

    def _write(self, conf: str) -> None:
        tmp = self.conf_path.with_suffix(".new")
        tmp.write_text(conf)
        tmp.replace(self.conf_path)

    def _relay(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._stop_reading()
            return
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line:
                loud = any(tag in line for tag in _LOUD) and "Shutdown completed" not in line  # BIRD: <FATAL>
                level = logging.WARNING if loud else logging.DEBUG
                log.log(level, "event=speaker_log line=%r", line)

    def _stop_reading(self) -> None:
        if self._reader_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._reader_fd)
            self._reader_fd = None

    def reap(self) -> int | None:
        """After an unexpected exit: stop relaying; the exit status."""
        self._stop_reading()
        status = self.proc.returncode if self.proc is not None else None
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        return status

    async def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (BIRD ends its sessions with a Cease), SIGKILL after ``timeout``; the runtime dir goes."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        if proc is not None:
            self.reap()
            log.info("event=speaker_stopped status=%s", proc.returncode)
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
            self.runtime = None
