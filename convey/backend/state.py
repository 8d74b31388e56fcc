"""What the backend tool installed on this server, and its record in ``/run/convey/backend-nat/<netns>.json``.

Each installed ``VIP:PORT`` is an :class:`Entry`; the :class:`State` also lists what the entries changed (the
old sysctl values, the VIPs added to lo, the qdiscs added), so a second VIP on the same server is added beside the
first and removing one leaves the other alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from convey.dataplane.kernel_state import Recorded, StateFile
from convey.errors import ConveyError
from convey.modes import Rewrite

STATE_TOOL = "backend-nat"  # the state files live in /run/convey/backend-nat/


class BackendNatError(ConveyError):
    """Something the user must fix (bad arguments, a missing interface, the kernel refusing); nothing changed."""


class UsageError(BackendNatError):
    """The arguments are incomplete or contradict each other; the message says what to give."""


class Method(StrEnum):
    """How the replies get the VIP back as their source (``rewrite = "ip"``)."""

    AUTO = "auto"  # tc where the kernel can, nft otherwise
    TC = "tc"  # tc act_nat, the original convey's recipe
    NFT = "nft"  # an nftables stateless rule


@dataclass(frozen=True, slots=True)
class Entry:
    """One installed (or planned) ``VIP:PORT`` on this server."""

    rewrite: Rewrite
    vip: str
    port: int
    server_port: int = 0
    server_addr: str = ""
    dev: str = ""
    method: Method | None = None  # ip: TC or NFT once installed (AUTO while planned); mac: None
    balancers: tuple[str, ...] = ()
    slot: int = -1  # tc only

    @property
    def key(self) -> str:
        return f"{self.vip}:{self.port}"

    def same_as(self, other: Entry) -> bool:
        return replace(self, slot=-1) == replace(other, slot=-1)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        data = dict(data)
        data["rewrite"] = Rewrite(data["rewrite"])
        data["method"] = Method(data["method"]) if data.get("method") else None
        data["balancers"] = tuple(data.get("balancers", ()))
        return cls(**data)


@dataclass(slots=True)
class State:
    entries: list[Entry] = field(default_factory=list)
    sysctls: Recorded = field(default_factory=dict)  # key -> {"old", "new"}
    lo_addrs: list[str] = field(default_factory=list)  # VIPs we added to lo
    qdiscs: list[str] = field(default_factory=list)  # devices whose root htb 10: we added

    def find(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def empty(self) -> bool:
        return not (self.entries or self.sysctls or self.lo_addrs or self.qdiscs)


def state_file(state_dir: Path | None = None) -> StateFile:
    """``<state_dir or /run/convey/backend-nat>/<netns name or "host">.json``."""
    return StateFile.here(state_dir, tool=STATE_TOOL)


def load_state(path: StateFile) -> State:
    data = path.load()
    if data is None:
        return State()
    return State(
        entries=[Entry.from_json(e) for e in data.get("entries", [])],
        sysctls=dict(data.get("sysctls", {})),
        lo_addrs=list(data.get("lo_addrs", [])),
        qdiscs=list(data.get("qdiscs", [])),
    )


def save_state(path: StateFile, state: State) -> None:
    """Write the record, or delete it once nothing is installed."""
    if state.empty():
        path.remove()
        return
    path.save(
        {
            "entries": [asdict(e) for e in state.entries],
            "sysctls": state.sysctls,
            "lo_addrs": state.lo_addrs,
            "qdiscs": state.qdiscs,
        }
    )
