"""Live reload: watch the config file and apply a new, valid config without restarting.

The file is polled (stat every ``poll_interval``), which works on every file system and for editors that replace the
file by renaming. A change is applied only once the file has stayed the same for one more poll (so a half-written file
is not read), and only if it validates: a bad file is logged with the same message ``convey check`` prints, the
running config stays, and the next change is tried again. SIGHUP forces an immediate reload. Nothing a reload raises
stops the watcher: an unexpected exception is logged (``event=reload_error``), reported to ``on_error`` like a
rejected file, and the watcher keeps watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from convey.config import Config, ConfigError, load_config

log = logging.getLogger("convey.reload")

Signature = tuple[int, int, int, int]


def describe(exc: BaseException) -> str:
    """``exc`` for a log line or /stats: its type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ConfigWatcher:
    def __init__(
        self,
        path: str | Path,
        apply: Callable[[Config], None],
        on_error: Callable[[Exception], None] | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.apply = apply
        self.on_error = on_error
        self.poll_interval = poll_interval
        self._seen = _signature(self.path)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="config-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def request_reload(self) -> None:
        """Reload now (SIGHUP)."""
        self._wake.set()

    def reload(self, reason: str) -> bool:
        """Load, validate and apply the file. Returns True when the new config was applied; never raises
        (an exception is logged and reported to ``on_error``)."""
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            log.error("event=reload_rejected reason=%s error=%r (running config kept)", reason, str(exc))
            self._report(exc)
            return False
        except Exception as exc:
            self._failed("load", reason, exc)
            return False
        log.info("event=reload reason=%s file=%s", reason, self.path)
        try:
            self.apply(config)
        except Exception as exc:
            self._failed("apply", reason, exc)
            return False
        return True

    def _failed(self, stage: str, reason: str, exc: Exception) -> None:
        """An unexpected exception: one ERROR line (the traceback at DEBUG), reported like a rejected file."""
        log.error(
            "event=reload_error reason=%s stage=%s error=%r (running config kept)",
            reason,
            stage,
            describe(exc),
        )
        log.debug("event=reload_error_traceback stage=%s", stage, exc_info=exc)
        self._report(exc)

    def _report(self, exc: Exception) -> None:
        if self.on_error is None:
            return
        try:
            self.on_error(exc)
        except Exception:  # a failing error counter must not stop the watcher either
            log.exception("event=reload_error stage=report")

    async def _run(self) -> None:
        pending: Signature | None = None
        while True:  # reload() never raises, so only cancel() ends this loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            if self._wake.is_set():
                self._wake.clear()
                self._seen = _signature(self.path)
                pending = None
                self.reload("signal")
                continue
            current = _signature(self.path)
            if current == self._seen or current is None:
                pending = None
                continue
            if current != pending:
                pending = current  # changed: wait one more poll for the writer to finish
                continue
            self._seen = current
            pending = None
            self.reload("file_changed")
