"""Network namespaces of test beds: the ``cvy-`` prefix, running a command in one, and deleting them (with every
process inside and the per-namespace state files convey keeps). Root only, except :func:`unusable_reason`."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import netns

from testbed.process import wait_until

PREFIX = "cvy-"
# convey's rules and the DSR backend tool keep per-namespace state here
CONVEY_STATE_DIR = Path("/run/convey")
NEEDED_TOOLS = ("ip", "iptables-save", "iptables-restore", "sysctl", "curl")


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def namespace_pids(ns: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False
    )
    return [int(pid) for pid in proc.stdout.split() if pid.isdigit()]


def delete_namespace(name: str) -> None:
    """Kill every process in namespace ``name`` and delete it; fine if it does not exist."""
    if name not in netns.listnetns():
        return
    for _ in range(3):  # processes may fork while we kill
        pids = namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(functools.partial(_none_left, name, set(pids)), 5.0, f"processes in {name} to die")
    netns.remove(name)
    # State files convey's rules and the DSR backend script keep per namespace.
    (CONVEY_STATE_DIR / f"{name}.json").unlink(missing_ok=True)
    (CONVEY_STATE_DIR / "backend-nat" / f"{name}.json").unlink(missing_ok=True)


def _none_left(ns: str, killed: set[int]) -> bool:
    return not set(namespace_pids(ns)) & killed


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace named ``prefix...`` (killing its processes); returns their names."""
    if not prefix:
        raise ValueError("refusing to delete every namespace: give a prefix")
    removed = []
    for name in sorted(netns.listnetns()):
        if name.startswith(prefix):
            delete_namespace(name)
            removed.append(name)
    return removed


@functools.cache
def unusable_reason() -> str | None:
    """Why test beds cannot be built here, or None when they can (probed once: create and delete one)."""
    if os.geteuid() != 0:
        return "needs root (euid 0) to build network namespaces"
    for tool in NEEDED_TOOLS:
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    probe = f"{PREFIX}{secrets.token_hex(3)}-probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, text=True, timeout=10)
        subprocess.run(
            ns_exec(probe, ["ip", "link", "set", "lo", "up"]),
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        return f"`ip netns` is unusable here: {str(detail).strip()}"
    finally:
        delete_namespace(probe)
    return None
