"""Kernel parameters under ``/proc/sys``, read and written in the current network namespace.

``/proc/sys/net`` shows the network namespace of the process that opens it, so a balancer running inside its
own namespace (``ip netns exec``) reads and changes that namespace only. Every write reports what it changed
as a :class:`Change` (old -> new) so callers can log it and put the old value back later.

Keys are written as sysctl(8) does: ``net.ipv4.ip_forward``. An interface name may contain dots
(``eth0.100``); such keys use ``/`` as the separator instead (``net/ipv4/conf/eth0.100/accept_local``), and
:func:`conf_key` builds them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC_SYS = Path("/proc/sys")


class SysctlError(Exception):
    """A kernel parameter that does not exist or cannot be read or written."""


@dataclass(frozen=True, slots=True)
class Change:
    """One kernel parameter that was changed: ``old`` is what to write back to undo it."""

    key: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"sysctl {self.key}: {_show(self.old)} -> {_show(self.new)}"


def conf_key(iface: str, setting: str, family: str = "ipv4") -> str:
    """The key of a per-interface setting, e.g. ``net.ipv4.conf.eth0.accept_local``."""
    if "/" in iface or not iface:
        raise SysctlError(f"not an interface name: {iface!r}")
    if "." in iface:
        return f"net/{family}/conf/{iface}/{setting}"
    return f"net.{family}.conf.{iface}.{setting}"


def path_of(key: str, root: Path = PROC_SYS) -> Path:
    """The file behind a key (``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not all(parts) or any(part in (".", "..") for part in parts):
        raise SysctlError(f"not a sysctl key: {key!r}")
    return root.joinpath(*parts)


def normalise(value: str) -> str:
    """A value with its whitespace normalised: ``"32768\\t60999\\n"`` -> ``"32768 60999"``."""
    return " ".join(value.split())


def exists(key: str, root: Path = PROC_SYS) -> bool:
    return path_of(key, root).is_file()


def read(key: str, root: Path = PROC_SYS) -> str:
    """The current value, whitespace normalised."""
    path = path_of(key, root)
    try:
        return normalise(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        raise SysctlError(f"sysctl {key}: no such parameter ({path})") from None
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: cannot read {path}: {exc.strerror or exc}") from None


def write(key: str, value: str | int, root: Path = PROC_SYS) -> Change | None:
    """Set a parameter; returns the change, or None when it already had that value.

    The new value in the change is read back from the kernel, which may normalise what was written (port
    lists, for example), so comparing it with a later :func:`read` is reliable.
    """
    wanted = normalise(str(value))
    old = read(key, root)
    if old == wanted:
        return None
    path = path_of(key, root)
    try:
        path.write_text(wanted + "\n", encoding="ascii")
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: cannot write {wanted!r} to {path}: {exc.strerror or exc}") from None
    new = read(key, root)
    if new == old:
        return None
    return Change(key, old, new)


def apply(settings: Mapping[str, str | int], root: Path = PROC_SYS) -> list[Change]:
    """Write several parameters in order; returns the ones that changed."""
    changes: list[Change] = []
    for key, value in settings.items():
        change = write(key, value, root)
        if change is not None:
            changes.append(change)
    return changes


def restore(changes: Iterable[Change], root: Path = PROC_SYS, force: bool = False) -> list[Change]:
    """Undo changes (latest first); returns the changes made by restoring.

    A parameter that no longer holds the value we set was changed by someone else since: it is left alone
    unless ``force``.
    """
    done: list[Change] = []
    for change in reversed(list(changes)):
        if not exists(change.key, root):
            continue  # the interface is gone, and its settings with it
        if not force and read(change.key, root) != change.new:
            continue
        undone = write(change.key, change.old, root)
        if undone is not None:
            done.append(undone)
    return done


def _show(value: str) -> str:
    return value if value else '""'
