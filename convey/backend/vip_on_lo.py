"""``rewrite = "mac"`` on the server: the balancer forwards ``client -> VIP`` frames unchanged to the server's MAC.

The server holds the VIP as ``VIP/32`` on ``lo`` and must not answer ARP for it: ``arp_ignore = 1`` (answer only
for addresses of the receiving interface) and ``arp_announce = 2`` (use the interface's own address as ARP
source) on ``all`` and on the device. Its replies then come from the VIP by themselves.
"""

from __future__ import annotations

from typing import Any

from convey.backend import links
from convey.backend.state import Entry, State
from convey.dataplane import kernel_state
from convey.modes import Rewrite

ARP_SETTINGS = (("arp_ignore", "1"), ("arp_announce", "2"))


def arp_keys(dev: str) -> list[tuple[str, str]]:
    return [(kernel_state.conf_key(name, key), value) for name in ("all", dev) for key, value in ARP_SETTINGS]


def install(ipr: Any, entry: Entry, state: State) -> list[str]:
    lines = []
    for key, value in arp_keys(entry.dev):
        change = kernel_state.write_recorded(state.sysctls, key, value)
        if change is not None:
            lines.append(str(change))
    if links.lo_has(ipr, entry.vip):
        whose = " (added by convey for another port)" if entry.vip in state.lo_addrs else ""
        lines.append(f"lo already holds {entry.vip}/32{whose}")
    else:
        ipr.addr("add", index=links.index(ipr, "lo"), address=entry.vip, prefixlen=32)
        state.lo_addrs.append(entry.vip)
        lines.append(f"ip addr add {entry.vip}/32 dev lo")
    return lines


def remove(ipr: Any, entry: Entry, state: State) -> list[str]:
    """Take the VIP off lo (when we put it there and no other entry needs it); with the last mac entry, put
    the ARP sysctls back."""
    lines = []
    others = [e for e in state.entries if e.rewrite == Rewrite.MAC and e.key != entry.key]
    if entry.vip in state.lo_addrs and not any(e.vip == entry.vip for e in others):
        state.lo_addrs.remove(entry.vip)
        if links.lo_has(ipr, entry.vip):
            ipr.addr("del", index=links.index(ipr, "lo"), address=entry.vip, prefixlen=32)
            lines.append(f"ip addr del {entry.vip}/32 dev lo")
    if not others:
        lines += kernel_state.restore_recorded(state.sysctls)
    return lines


def present(ipr: Any, entry: Entry) -> bool:
    return links.lo_has(ipr, entry.vip) and all(
        kernel_state.exists(k) and kernel_state.read(k) == v for k, v in arp_keys(entry.dev)
    )
