"""The server's interfaces and addresses, as the backend tool needs them (``ipr``: an IPRoute from
:func:`convey.dataplane.kernel_state.iproute`)."""

from __future__ import annotations

import socket
from typing import Any

from convey.backend.state import BackendNatError

AF_INET = socket.AF_INET
RT_TABLE_MAIN = 254


def index(ipr: Any, dev: str) -> int:
    """The interface index of ``dev``; an error listing the interfaces there are when there is none."""
    found = ipr.link_lookup(ifname=dev)
    if not found:
        names = sorted(str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())
        raise BackendNatError(f"no interface {dev!r} here (interfaces: {', '.join(names)})")
    return int(found[0])


def default_dev(ipr: Any) -> str:
    """The interface of the default route; else the only interface besides lo with an IPv4 address."""
    for route in ipr.get_routes(family=AF_INET, table=RT_TABLE_MAIN):
        if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
            return str(ipr.get_links(route.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME"))
    lo = ipr.link_lookup(ifname="lo")
    indexes = sorted({m["index"] for m in ipr.get_addr(family=AF_INET) if m["index"] not in lo})
    if len(indexes) == 1:
        return str(ipr.get_links(indexes[0])[0].get_attr("IFLA_IFNAME"))
    raise BackendNatError("no default route and several interfaces with IPv4 addresses: give --dev")


def primary_addr(ipr: Any, dev: str) -> str:
    """The first IPv4 address of ``dev``."""
    for msg in ipr.get_addr(family=AF_INET, index=index(ipr, dev)):
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if addr:
            return str(addr)
    raise BackendNatError(
        f"{dev} has no IPv4 address: give --server-addr (the address the balancer sends to)"
    )


def lo_has(ipr: Any, addr: str) -> bool:
    """Whether lo holds ``addr/32``."""
    lo = index(ipr, "lo")
    return any(
        (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) == addr and m["prefixlen"] == 32
        for m in ipr.get_addr(family=AF_INET, index=lo)
    )
