"""Kernel state convey changes and must put back: sysctls, the JSON record of what changed, netlink access.

Used alike by the balancer's rules (:mod:`convey.dataplane.rules`) and by the DSR servers' tool
(:mod:`convey.backend`):

- **sysctls** under ``/proc/sys``, read and written in the current network namespace (``/proc/sys/net`` shows
  the namespace of the process that opens it). Keys are written as sysctl(8) does, ``net.ipv4.ip_forward``; an
  interface name may contain dots (``eth0.100``), so such keys use ``/`` as the separator
  (``net/ipv4/conf/eth0.100/accept_local``) and :func:`conf_key` builds them. Every write reports a
  :class:`Change` (old -> new). :func:`write_recorded` and :func:`restore_recorded` keep the value each key had
  before convey first changed it, in a plain dict a state file holds, and put it back later unless someone
  changed the key since.
- **the state file**: ``/run/convey/[<tool>/]<netns name or "host">.json`` (:class:`StateFile`). ``/run`` is a
  tmpfs, so the record lives exactly as long as the kernel state it describes.
- **netlink**: :func:`iproute`, the one way convey opens pyroute2's ``IPRoute``; a netlink error nobody handled
  inside the block becomes a :class:`NetlinkFailure` that says what was being done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convey.errors import ConveyError

PROC_SYS = Path("/proc/sys")
STATE_ROOT = Path("/run/convey")
STATE_VERSION = 1

Recorded = dict[str, dict[str, str]]
"""sysctl key -> ``{"old": value before convey changed it, "new": value convey set}``."""


class KernelStateError(ConveyError):
    """The kernel's state could not be read or changed as needed."""


class SysctlError(KernelStateError):
    """A kernel parameter that does not exist or cannot be read or written."""


class StateFileError(KernelStateError):
    """The record of what convey changed cannot be read or written."""


class NetlinkFailure(KernelStateError):
    """The kernel refused a netlink request (routes, rules, addresses, tc) nobody expected to fail."""


# -- sysctls -------------------------------------------------------------------------------------------------


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


def path_of(key: str, root: Path | None = None) -> Path:
    """The file behind a key (``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not all(parts) or any(part in (".", "..") for part in parts):
        raise SysctlError(f"not a sysctl key: {key!r}")
    return (PROC_SYS if root is None else root).joinpath(*parts)


def normalise(value: str) -> str:
    """A value with its whitespace normalised: ``"32768\\t60999\\n"`` -> ``"32768 60999"``."""
    return " ".join(value.split())


def exists(key: str, root: Path | None = None) -> bool:
    return path_of(key, root).is_file()


def read(key: str, root: Path | None = None) -> str:
    """The current value, whitespace normalised."""
    path = path_of(key, root)
    try:
        return normalise(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        raise SysctlError(f"sysctl {key}: no such parameter ({path})") from None
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: cannot read {path}: {exc.strerror or exc}") from None


def write(key: str, value: str | int, root: Path | None = None) -> Change | None:
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


def apply(settings: Mapping[str, str | int], root: Path | None = None) -> list[Change]:
    """Write several parameters in order; returns the ones that changed."""
    changes: list[Change] = []
    for key, value in settings.items():
        change = write(key, value, root)
        if change is not None:
            changes.append(change)
    return changes


def restore(changes: Iterable[Change], root: Path | None = None, force: bool = False) -> list[Change]:
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


def write_recorded(recorded: Recorded, key: str, value: str | int, root: Path | None = None) -> Change | None:
    """:func:`write`, remembering in ``recorded`` the value ``key`` had before convey first changed it."""
    change = write(key, value, root)
    if change is not None:
        if key in recorded:
            recorded[key]["new"] = change.new
        else:
            recorded[key] = {"old": change.old, "new": change.new}
    return change


def restore_recorded(
    recorded: Recorded, keys: Iterable[str] | None = None, root: Path | None = None
) -> list[str]:
    """Put back the recorded old values of ``keys`` (every recorded key when None), latest first, and forget
    them. A key that no longer holds the value convey set was changed by someone since: it is left as it is,
    and said so. Returns one line per key changed or left."""
    wanted = None if keys is None else set(keys)
    lines = []
    for key in reversed(list(recorded)):
        if wanted is not None and key not in wanted:
            continue
        values = recorded.pop(key)
        if not exists(key, root):
            continue  # the interface is gone, and its settings with it
        now = read(key, root)
        if now != values["new"]:
            lines.append(f"sysctl {key}: left at {now} (convey had set {values['new']}; changed since)")
            continue
        change = write(key, values["old"], root)
        if change is not None:
            lines.append(str(change))
    return lines


def _show(value: str) -> str:
    return value if value else '""'


# -- the state file ------------------------------------------------------------------------------------------


def namespace_name() -> str:
    """The name of the current network namespace: its ``ip netns`` name, ``host`` for the initial one."""
    mine = os.stat("/proc/self/ns/net")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/run/netns")):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join("/run/netns", name))
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return name
    # kthreadd (pid 2) always lives in the initial namespace; pid 1 may be unreadable (containers, sandboxes)
    for pid in (2, 1):
        with contextlib.suppress(OSError):
            init = os.stat(f"/proc/{pid}/ns/net")
            same = (init.st_dev, init.st_ino) == (mine.st_dev, mine.st_ino)
            return "host" if same else f"netns-{mine.st_ino}"
    return f"netns-{mine.st_ino}"


@dataclass(frozen=True, slots=True)
class StateFile:
    """A JSON document recording what convey changed in one network namespace (format :data:`STATE_VERSION`)."""

    path: Path

    @classmethod
    def here(cls, directory: Path | None = None, tool: str = "") -> StateFile:
        """The state file of the current namespace: ``<directory or /run/convey>[/<tool>]/<namespace>.json``."""
        base = STATE_ROOT if directory is None else directory
        return cls((base / tool if tool and directory is None else base) / f"{namespace_name()}.json")

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, Any] | None:
        """The document (``version`` included), or None when there is none."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateFileError(
                f"cannot read convey state {self.path}: {exc}; remove it after checking"
            ) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateFileError(f"convey state {self.path} has an unknown format; remove it after checking")
        return data

    def save(self, doc: Mapping[str, Any]) -> None:
        """Write ``doc`` (with the format version) atomically: a reader sees the old or the new document."""
        text = json.dumps({**doc, "version": STATE_VERSION}, indent=2, sort_keys=True) + "\n"
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            raise StateFileError(f"cannot write convey state {self.path}: {exc.strerror or exc}") from None

    def remove(self) -> None:
        """Remove the record, and the directories below :data:`STATE_ROOT` (included) that it leaves empty."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateFileError(f"cannot remove convey state {self.path}: {exc.strerror or exc}") from None
        root = STATE_ROOT
        for parent in self.path.parents:
            if parent != root and root not in parent.parents:
                break  # not a directory of convey's state root: leave it
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (another record), or already gone
            if parent == root:
                break


# -- netlink -------------------------------------------------------------------------------------------------


def errno_text(code: int) -> str:
    """``EPERM (Operation not permitted)`` for a positive errno."""
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


@contextlib.contextmanager
def iproute(doing: str) -> Iterator[Any]:
    """A pyroute2 ``IPRoute`` on the current network namespace, closed after the block.

    A ``NetlinkError`` that leaves the block (one its code did not expect and handle) becomes a
    :class:`NetlinkFailure`: ``<doing>: the kernel refused a netlink request: EPERM (Operation not permitted)``.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ipr = IPRoute()
    # pyroute2 0.9.7's synchronous nlm_request reads this key, which only the generic socket sets up
    ipr.status.setdefault("nlm_generator", False)
    try:
        yield ipr
    except NetlinkError as exc:
        code = exc.code if isinstance(exc.code, int) and exc.code > 0 else errno.EIO
        raise NetlinkFailure(f"{doing}: the kernel refused a netlink request: {errno_text(code)}") from None
    finally:
        ipr.close()
