"""The sysctls a packet mode needs on the balancer: which (decided from the config and current values), set with a
record of the old values, restored, and checked.

passthrough: ``ip_forward=1``; ``accept_local=1`` on ``all`` and on the interfaces towards the servers and holding
the VIPs (the rewritten packets carry a balancer address as source: martians without it); ``rp_filter`` 2 where
it is 1 (strict filtering drops the rewritten packets even with accept_local, measured; the kernel uses
max(all, interface), so loose where strict is enough); the ephemeral range added to
``ip_local_reserved_ports``. DSR: ``ip_forward=1``, ``send_redirects=0`` on ``all`` and those interfaces.
With flow offload, the conntrack settings of ``offload.sysctls`` too, and passthrough changes neither
accept_local nor rp_filter (conntrack NATs the packets: no martians; measured with accept_local=0, rp_filter=1).
"""

from __future__ import annotations

from collections.abc import Callable

from convey.config import Config
from convey.dataplane import kernel_state
from convey.dataplane.kernel_state import Recorded
from convey.dataplane.rules.offload import sysctls as offload_sysctls
from convey.dataplane.rules.ruleset import IP_FORWARD, RESERVED_PORTS
from convey.modes import Mode

ACCEPT_LOCAL = "net.ipv4.conf.all.accept_local"
RP_FILTER = "net.ipv4.conf.all.rp_filter"


def port_ranges(value: str) -> list[tuple[int, int]]:
    """``"8080,39000-45000"`` -> ``[(8080, 8080), (39000, 45000)]``."""
    ranges = []
    for token in value.replace(" ", "").split(","):
        if not token:
            continue
        lo, _, hi = token.partition("-")
        ranges.append((int(lo), int(hi or lo)))
    return ranges


def covers(value: str, lo: int, hi: int) -> bool:
    """Whether the port list ``value`` holds every port of ``lo..hi``."""
    want = lo
    for a, b in sorted(port_ranges(value)):
        if a > want:
            break
        want = max(want, b + 1)
        if want > hi:
            return True
    return want > hi


def with_reserved(value: str, lo: int, hi: int) -> str:
    """The port list ``value`` with ``lo-hi`` added (unchanged when it already covers them)."""
    if covers(value, lo, hi):
        return value
    return ",".join(t for t in (value.replace(" ", ""), f"{lo}-{hi}") if t)


def wanted(
    config: Config,
    mode: Mode,
    ifaces: list[str],
    originals: dict[str, str],
    current: Callable[[str], str] = kernel_state.read,
    offload: bool = False,
) -> dict[str, str]:
    """key -> value for ``mode`` with these interfaces. Decisions that depend on a value (rp_filter, the reserved
    ports) start from the value before convey changed it (``originals``), else from ``current(key)``.
    ``offload``: the conntrack settings of :func:`convey.dataplane.rules.offload.sysctls` too, and, passthrough,
    no accept_local or rp_filter change (conntrack's NAT rewrites; measured unneeded)."""
    result = {IP_FORWARD: "1"}
    if offload:
        result.update(offload_sysctls(config, mode))
    if mode == Mode.PASSTHROUGH and offload:
        lo, hi = config.passthrough.port_range
        base = originals.get(RESERVED_PORTS, current(RESERVED_PORTS))
        result[RESERVED_PORTS] = with_reserved(base, lo, hi)
    elif mode == Mode.PASSTHROUGH:
        result[ACCEPT_LOCAL] = "1"
        for name in ifaces:
            result[kernel_state.conf_key(name, "accept_local")] = "1"
        for name in ["all", *ifaces]:
            key = kernel_state.conf_key(name, "rp_filter")
            if originals.get(key, current(key)) == "1":
                result[key] = "2"
        lo, hi = config.passthrough.port_range
        base = originals.get(RESERVED_PORTS, current(RESERVED_PORTS))
        result[RESERVED_PORTS] = with_reserved(base, lo, hi)
    else:
        result["net.ipv4.conf.all.send_redirects"] = "0"
        for name in ifaces:
            result[kernel_state.conf_key(name, "send_redirects")] = "0"
    return result


def install(want: dict[str, str], recorded: Recorded) -> list[str]:
    """Put back what an earlier install set and this one does not want, then set ``want``; one line each."""
    lines = kernel_state.restore_recorded(recorded, [key for key in recorded if key not in want])
    for key, value in want.items():
        change = kernel_state.write_recorded(recorded, key, value)
        if change is not None:
            lines.append(str(change))
    return lines


def problems(config: Config, mode: Mode, offload: bool = False) -> list[str]:
    """What is not set as ``mode`` needs (global settings only; per-interface ones are install's business)."""
    found = []
    if kernel_state.read(IP_FORWARD) != "1":
        found.append(f"sysctl {IP_FORWARD} is not 1")
    if offload:
        for key, value in offload_sysctls(config, mode).items():
            now = kernel_state.read(key) if kernel_state.exists(key) else "(missing)"
            if now != value:
                found.append(f"sysctl {key} is {now}, not {value}")
    if mode == Mode.PASSTHROUGH and offload:
        lo, hi = config.passthrough.port_range
        if not covers(kernel_state.read(RESERVED_PORTS), lo, hi):
            found.append(f"sysctl {RESERVED_PORTS} does not reserve {lo}-{hi}")
    elif mode == Mode.PASSTHROUGH:
        if kernel_state.read(ACCEPT_LOCAL) != "1":
            found.append(f"sysctl {ACCEPT_LOCAL} is not 1")
        if kernel_state.read(RP_FILTER) == "1":
            found.append(f"sysctl {RP_FILTER} is 1 (strict): rewritten packets would be dropped")
        lo, hi = config.passthrough.port_range
        if not covers(kernel_state.read(RESERVED_PORTS), lo, hi):
            found.append(f"sysctl {RESERVED_PORTS} does not reserve {lo}-{hi}")
    return found
