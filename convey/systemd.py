"""sd_notify without a dependency: tell systemd (``Type=notify``) where convey stands.

systemd passes ``NOTIFY_SOCKET``: the path of an ``AF_UNIX`` datagram socket, or an abstract socket name
written with a leading ``@`` (the kernel's leading NUL byte). convey sends ``READY=1`` once its data plane and
stats service run, ``RELOADING=1`` (with ``MONOTONIC_USEC``, as systemd 253 asks) before a reload and ``READY=1``
after it, and ``STOPPING=1`` when it stops. Without ``NOTIFY_SOCKET`` every call does nothing; a failed send is
logged at DEBUG and never raised: a notification is never worth stopping the balancer for.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping"]

log = logging.getLogger("convey.systemd")


def _address(path: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a socket address: ``@name`` is the abstract ``\\0name``."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``; True if sent, False if not asked or failed."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return False  # not under systemd (or a vsock address, which convey does not speak)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(path))
            sock.sendall(state.encode())
    except OSError as exc:
        log.debug("event=sd_notify_failed socket=%s state=%s error=%r", path, state.replace("\n", ","), exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
