"""Prepare (or unprepare) this server for convey's DSR mode: plan an entry from the arguments, install it, remove
it, show what is installed. ``install`` is idempotent; ``remove`` puts back exactly what install changed.

``rewrite = "ip"``: the balancer sends ``client -> SERVER:SPORT``; the replies leave as ``SERVER:SPORT -> client``
and must leave as ``VIP:PORT -> client``: an egress NAT, stateless (no conntrack), by tc
(:mod:`convey.backend.egress_tc`) or nftables (:mod:`convey.backend.egress_nft`). ``--method auto`` (the
default) takes tc when the ports are equal and the kernel has ``act_nat`` and ``act_gact``, nft otherwise; when
the kernel cannot tell, it tries tc and falls back to nft if the kernel refuses the action. It says which method
it took and why. ``--method tc`` fails with a clear error (after removing what it added) without act_nat.

The replies to the balancer's health checks leave by the same rule unless they are excluded: they would come
back from the VIP, the balancer would drop them and mark the server down. So ``rewrite = "ip"`` needs the
balancer's address (``balancers``, repeatable): replies to it keep the server's address.

``rewrite = "mac"``: the VIP on lo and the ARP sysctls (:mod:`convey.backend.vip_on_lo`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from convey.backend import egress_nft, egress_tc, links, vip_on_lo
from convey.backend.state import (
    BackendNatError,
    Entry,
    Method,
    State,
    UsageError,
    load_state,
    save_state,
    state_file,
)
from convey.dataplane import kernel_state
from convey.modes import Rewrite

NEEDS_BALANCER = (
    "--rewrite ip needs --balancer ADDR, the address the balancer health-checks this server from (repeat it "
    "for each balancer): without it the egress NAT would also rewrite the replies to the health checks, they "
    "would come back from the VIP and the balancer would mark this server down"
)


def _check_ipv4(value: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise BackendNatError(f"{what} must be an IPv4 address, got {value!r}") from None


def _check_port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise BackendNatError(f"{what} must be 1-65535, got {value}")
    return value


def plan(
    rewrite: str,
    vip: str,
    port: int,
    server_port: int | None = None,
    dev: str | None = None,
    method: str = Method.AUTO,
    server_addr: str | None = None,
    balancers: Sequence[str] = (),
) -> Entry:
    """The entry an install with these arguments describes (arguments checked, defaults not resolved yet)."""
    if rewrite not in tuple(Rewrite):
        raise UsageError(f"--rewrite must be one of {', '.join(Rewrite)}, got {rewrite!r}")
    if method not in tuple(Method):
        raise UsageError(f"--method must be one of {', '.join(Method)}, got {method!r}")
    kind, how = Rewrite(rewrite), Method(method)
    vip = _check_ipv4(vip, "--vip")
    port = _check_port(port, "--port")
    sport = _check_port(server_port, "--server-port") if server_port is not None else port
    addr = _check_ipv4(server_addr, "--server-addr") if server_addr else ""
    lbs = tuple(_check_ipv4(b, "--balancer") for b in balancers)
    # mac: the replies leave from the VIP by themselves, and those to the balancer are left alone
    if kind == Rewrite.MAC:
        return Entry(rewrite=kind, vip=vip, port=port, server_port=port, server_addr=addr, dev=dev or "")
    if how == Method.TC and sport != port:
        raise BackendNatError(
            f"--server-port {sport} differs from --port {port}: tc's nat action rewrites addresses only and "
            "cannot restore the port (use --method nft or auto, or the same port)"
        )
    if not lbs:
        raise UsageError(NEEDS_BALANCER)
    return Entry(
        rewrite=kind,
        vip=vip,
        port=port,
        server_port=sport,
        server_addr=addr,
        dev=dev or "",
        method=how,
        balancers=lbs,
    )


def _resolve(ipr: Any, entry: Entry) -> Entry:
    dev = entry.dev or links.default_dev(ipr)
    links.index(ipr, dev)
    if entry.rewrite == Rewrite.MAC:
        return replace(entry, dev=dev)
    server_addr = entry.server_addr or links.primary_addr(ipr, dev)
    if server_addr == entry.vip:
        raise BackendNatError(f"the server address {server_addr} is the VIP: give --server-addr")
    return replace(entry, dev=dev, server_addr=server_addr)


def install(entry: Entry, state_dir: Path | None = None) -> list[str]:
    """Install ``entry`` (from :func:`plan`); idempotent. Returns what happened, one line each."""
    path = state_file(state_dir)
    state = load_state(path)
    lines: list[str] = []
    with kernel_state.iproute(f"install {entry.key}") as ipr:
        entry = _resolve(ipr, entry)
        old = state.find(entry.key)
        if old is not None and _compatible(old, entry) and _present(ipr, old):
            return [f"{entry.key}: already installed ({_describe(old)}), unchanged"]
        try:
            if old is not None:
                if _compatible(old, entry):
                    lines.append(f"{entry.key}: recorded but missing from the kernel; installing it again")
                lines += _remove_entry(ipr, old, state)  # the previous setup, or whatever half of it is left
                state.entries.remove(old)
                if not _compatible(old, entry):
                    lines.append(f"{entry.key}: removed the previous setup ({_describe(old)})")
            if entry.rewrite == Rewrite.MAC:
                lines += vip_on_lo.install(ipr, entry, state)
            else:
                entry, more = _install_ip(ipr, entry, state)
                lines += more
            state.entries.append(entry)
        finally:
            save_state(path, state)
    return lines


def _compatible(old: Entry, new: Entry) -> bool:
    """An installed entry satisfies a new request (``auto`` accepts whatever method was chosen)."""
    if new.method == Method.AUTO:
        return old.same_as(replace(new, method=old.method))
    return old.same_as(new)


def _present(ipr: Any, entry: Entry) -> bool:
    if entry.rewrite == Rewrite.MAC:
        return vip_on_lo.present(ipr, entry)
    if entry.method == Method.NFT:
        return egress_nft.present(entry)
    return egress_tc.has_filters(ipr, entry)


def _describe(entry: Entry) -> str:
    if entry.rewrite == Rewrite.MAC:
        return f"mac: {entry.vip}/32 on lo, arp_ignore=1 arp_announce=2 on all and {entry.dev}"
    ports = f"{entry.server_port}->{entry.port}" if entry.server_port != entry.port else str(entry.port)
    return f"ip: {entry.method} egress NAT on {entry.dev}: {entry.server_addr} -> {entry.vip}, port {ports}"


def _install_ip(ipr: Any, entry: Entry, state: State) -> tuple[Entry, list[str]]:
    """The egress NAT by the method asked for (auto: tc when the kernel can, nft otherwise, saying why)."""
    if entry.method == Method.TC:
        _, _, evidence = egress_tc.tc_support()
        try:
            entry = egress_tc.install(ipr, entry, state, evidence)
        except egress_tc.TcUnavailable as exc:
            raise egress_tc.TcUnavailable(
                f"tc egress NAT impossible here: {exc}. Use --method nft (or auto)"
            ) from None
        return entry, [f"method: tc (as asked; {evidence})", egress_tc.describe(entry)]
    if entry.method == Method.NFT:
        why = "method: nft (as asked)"
    elif entry.server_port != entry.port:
        why = "method: nft (auto: the ports differ and tc's nat action cannot restore ports)"
    else:
        ok, headline, evidence = egress_tc.tc_support()
        if ok is False:
            why = f"method: nft (auto: {headline}: {evidence})"
        else:
            try:
                entry = egress_tc.install(ipr, entry, state, evidence)
            except egress_tc.TcUnavailable as exc:
                why = f"method: nft (auto: {exc})"
            else:
                return entry, [f"method: tc (auto: {evidence})", egress_tc.describe(entry)]
    entry = replace(entry, method=Method.NFT)
    egress_nft.sync([*(e for e in state.entries if e.method == Method.NFT), entry])
    rule = f"nft: table {egress_nft.NFT_FAMILY} {egress_nft.NFT_TABLE} chain {egress_nft.NFT_CHAIN}"
    return entry, [why, f"{rule}: {egress_nft.rule(entry)}"]


def _remove_entry(ipr: Any, entry: Entry, state: State) -> list[str]:
    if entry.rewrite == Rewrite.MAC:
        return vip_on_lo.remove(ipr, entry, state)
    if entry.method == Method.TC:
        return egress_tc.remove(ipr, entry, state)
    egress_nft.sync([e for e in state.entries if e.method == Method.NFT and e.key != entry.key])
    return [
        f"nft: removed the rule for {entry.key} from table {egress_nft.NFT_FAMILY} {egress_nft.NFT_TABLE}"
    ]


def remove(vip: str, port: int, state_dir: Path | None = None) -> list[str]:
    """Undo what install did for ``VIP:PORT``; fine when nothing is installed (says so)."""
    key = f"{_check_ipv4(vip, '--vip')}:{_check_port(port, '--port')}"
    path = state_file(state_dir)
    state = load_state(path)
    entry = state.find(key)
    if entry is None:
        return [f"{key}: nothing installed (no record in {path.path}), nothing to remove"]
    with kernel_state.iproute(f"remove {key}") as ipr:
        try:
            lines = _remove_entry(ipr, entry, state)
        finally:
            state.entries.remove(entry)
            save_state(path, state)
    return lines


def show(state_dir: Path | None = None) -> list[str]:
    state = load_state(state_file(state_dir))
    if not state.entries:
        return ["nothing installed"]
    return [f"{e.key}: {_describe(e)}" for e in state.entries]
