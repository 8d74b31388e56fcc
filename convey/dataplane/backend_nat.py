"""The server side of DSR: egress NAT for ``rewrite = "ip"``, the VIP on ``lo`` for ``rewrite = "mac"``.

Run on each server (root, in the server's network namespace), usually through ``scripts/setup-dsr-backend.sh``::

    python -m convey.dataplane.backend_nat install|remove --vip VIP --port PORT [--server-port PORT]
        [--rewrite ip|mac] [--dev IFACE] [--method auto|tc|nft] [--server-addr ADDR] [--balancer ADDR ...]
    python -m convey.dataplane.backend_nat show

``rewrite = "ip"``: the balancer sends ``client -> SERVER:SPORT``; the server's replies leave as
``SERVER:SPORT -> client`` and must leave as ``VIP:PORT -> client``. Two ways, both stateless (no conntrack):

- ``tc``, as the original convey's recipe: on ``--dev``, ``qdisc root handle 10: htb``, a u32 filter at prio 1
  with ``action ok`` for replies to the VIP itself (and to each ``--balancer`` address), and one at prio 10 with
  ``action nat egress SERVER VIP``. Needs the kernel's ``act_nat`` and ``act_gact``; rewrites addresses only, so
  ``--server-port`` must equal ``--port``. The filters are built with pyroute2 (:mod:`convey.dataplane.tc_nat`).
- ``nft``: ``table ip convey_dsr``, a ``postrouting`` filter chain (priority 100) with one rule per VIP:
  ``oifname DEV ip saddr SERVER ip daddr != {VIP, BALANCERS} tcp sport SPORT ip saddr set VIP [tcp sport set
  PORT]``. nftables fixes the IP and TCP checksums itself. The table is ours; it is rewritten as a whole
  (atomically) on each change and deleted with its last rule.

``--method auto`` (the default) takes ``tc`` when the ports are equal and the kernel has ``act_nat`` and
``act_gact`` (built in, loaded, or loadable, as ``/sys/module``, the kernel config and ``modprobe -n`` tell), and
``nft`` otherwise; when the kernel cannot tell, it tries tc and falls back to nft if the kernel refuses the
action (``ENOENT``/``EOPNOTSUPP``). It says which method it took and why. ``--method tc`` always tries tc and
fails with a clear error (after removing what it added) when the kernel has no ``act_nat``.

``--balancer ADDR`` matters when the balancer health-checks the server on the same interface the replies to
clients leave by (one L2 segment): without it the replies to the health checks would be rewritten to come
from the VIP, and the balancer would drop them (a packet from its own address) and mark the server down.

``rewrite = "mac"``: the balancer forwards ``client -> VIP`` frames unchanged to the server's MAC. The server
holds the VIP as ``VIP/32`` on ``lo`` and must not answer ARP for it: ``arp_ignore = 1`` and ``arp_announce =
2`` on ``all`` and on ``--dev``. The server's replies come from the VIP by themselves.

``install`` is idempotent; ``remove`` puts back exactly what install changed. Both keep a small JSON state file,
``/run/convey/backend-nat/<netns name or "host">.json``, listing each installed ``VIP:PORT`` with what it
changed (the old sysctl values, whether the VIP was already on ``lo``, whether the qdisc was ours), so a
second VIP on the same server is added beside the first, and removing one leaves the other alone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import ipaddress
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from convey.dataplane import sysctl

STATE_DIR = Path("/run/convey/backend-nat")
STATE_VERSION = 1

REWRITES = ("ip", "mac")
METHODS = ("auto", "tc", "nft")

NFT_FAMILY = "ip"
NFT_TABLE = "convey_dsr"
NFT_CHAIN = "postrouting"
NFT_PRIORITY = 100  # srcnat: after every mangle and filter hook that might care about the original source

TC_QDISC = 0x100000  # "10:"
TC_ROOT = 0xFFFFFFFF
SKIP_PRIO = 1  # slot s uses prio SKIP_PRIO + s for its "action ok" filters ...
NAT_PRIO = 10  # ... and NAT_PRIO + s for its nat filter: slot 0 is exactly the original recipe
TC_SLOTS = NAT_PRIO - SKIP_PRIO  # so every skip filter comes before every nat filter

ARP_SETTINGS = (("arp_ignore", "1"), ("arp_announce", "2"))
AF_INET = socket.AF_INET

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class BackendNatError(Exception):
    """Something the user must fix (bad arguments, a missing interface, the kernel refusing); nothing changed."""


class TcUnavailable(BackendNatError):
    """The kernel cannot do the tc recipe (no act_nat or act_gact)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One installed ``VIP:PORT`` on this server."""

    rewrite: str
    vip: str
    port: int
    server_port: int = 0
    server_addr: str = ""
    dev: str = ""
    method: str = ""  # "tc" or "nft" (ip); "" (mac)
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
        data["balancers"] = tuple(data.get("balancers", ()))
        return cls(**data)


@dataclass(slots=True)
class State:
    entries: list[Entry] = field(default_factory=list)
    sysctls: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> {"old", "new"}
    lo_addrs: list[str] = field(default_factory=list)  # VIPs we added to lo
    qdiscs: list[str] = field(default_factory=list)  # devices whose root htb 10: we added

    def find(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)


# -- state file ----------------------------------------------------------------------------------------------


def state_path(state_dir: Path | None = None) -> Path:
    from convey.dataplane.rules import namespace_name

    return (state_dir or STATE_DIR) / f"{namespace_name()}.json"


def load_state(path: Path) -> State:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        raise BackendNatError(f"cannot read {path}: {exc}; remove it after checking") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise BackendNatError(f"{path} has an unknown format; remove it after checking")
    return State(
        entries=[Entry.from_json(e) for e in data.get("entries", [])],
        sysctls=dict(data.get("sysctls", {})),
        lo_addrs=list(data.get("lo_addrs", [])),
        qdiscs=list(data.get("qdiscs", [])),
    )


def save_state(path: Path, state: State) -> None:
    if not (state.entries or state.sysctls or state.lo_addrs or state.qdiscs):
        path.unlink(missing_ok=True)
        return
    doc = {
        "version": STATE_VERSION,
        "entries": [asdict(e) for e in state.entries],
        "sysctls": state.sysctls,
        "lo_addrs": state.lo_addrs,
        "qdiscs": state.qdiscs,
    }
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- kernel facts --------------------------------------------------------------------------------------------


def _kernel_config() -> tuple[str, list[str]] | None:
    release = platform.release()
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        return str(path), raw.decode(errors="replace").splitlines()
    return None


def kernel_has_action(kind: str) -> tuple[bool | None, str]:
    """Whether the kernel has the tc action ``kind`` (``nat``, ``gact``): True/False with the evidence, or
    None when nothing here tells (then only trying says)."""
    module = f"act_{kind}"
    option = f"CONFIG_NET_ACT_{kind.upper()}"
    if Path("/sys/module", module).exists():
        return True, f"{module} is loaded"
    found = _kernel_config()
    if found is not None:
        source, lines = found
        if f"{option}=y" in lines:
            return True, f"{option}=y in {source} (built in)"
        if f"{option}=m" in lines:
            if _modprobe_dry_run(module):
                return True, f"{option}=m in {source} and modprobe finds {module}"
            return False, f"{option}=m in {source} but modprobe cannot find {module}"
        return False, f"{option} is not set in {source}"
    if _modprobe_dry_run(module):
        return True, f"modprobe finds {module}"
    return None, f"cannot tell whether the kernel has {module} (no kernel config, modprobe does not find it)"


def _modprobe_dry_run(module: str) -> bool:
    if shutil.which("modprobe") is None:
        return False
    try:
        proc = subprocess.run(["modprobe", "-n", "-q", module], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def tc_support() -> tuple[bool | None, str, str]:
    """Whether the tc recipe can work here (it needs act_nat and act_gact): True/False/None, a headline
    ("act_nat not available", "" when nothing is missing) and the kernel facts behind it."""
    nat, nat_why = kernel_has_action("nat")
    gact, gact_why = kernel_has_action("gact")
    facts = f"{nat_why}; {gact_why}"
    if nat is False:
        return False, "act_nat not available", facts
    if gact is False:
        return False, "act_gact not available (tc `action ok`)", facts
    return (True if nat and gact else None), "", facts


# -- interfaces and addresses (pyroute2) ---------------------------------------------------------------------


def _iproute() -> Any:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    # pyroute2 0.9.7's synchronous nlm_request reads this key, which only the generic socket sets up
    ipr.status.setdefault("nlm_generator", False)
    return ipr


def _index(ipr: Any, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        names = sorted(str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())
        raise BackendNatError(f"no interface {dev!r} here (interfaces: {', '.join(names)})")
    return int(found[0])


def default_dev(ipr: Any) -> str:
    """The interface of the default route; else the only interface besides lo with an IPv4 address."""
    for route in ipr.get_routes(family=AF_INET, table=254):
        if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
            return str(ipr.get_links(route.get_attr("RTA_OIF"))[0].get_attr("IFLA_IFNAME"))
    lo = ipr.link_lookup(ifname="lo")
    indexes = sorted({m["index"] for m in ipr.get_addr(family=AF_INET) if m["index"] not in lo})
    if len(indexes) == 1:
        return str(ipr.get_links(indexes[0])[0].get_attr("IFLA_IFNAME"))
    raise BackendNatError("no default route and several interfaces with IPv4 addresses: give --dev")


def primary_addr(ipr: Any, dev: str) -> str:
    index = _index(ipr, dev)
    for msg in ipr.get_addr(family=AF_INET, index=index):
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if addr:
            return str(addr)
    raise BackendNatError(
        f"{dev} has no IPv4 address: give --server-addr (the address the balancer sends to)"
    )


def _lo_has(ipr: Any, addr: str) -> bool:
    lo = _index(ipr, "lo")
    return any(
        (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")) == addr and m["prefixlen"] == 32
        for m in ipr.get_addr(family=AF_INET, index=lo)
    )


# -- nftables ------------------------------------------------------------------------------------------------


def _nft(script: str) -> str:
    if shutil.which("nft") is None:
        raise BackendNatError(
            "the nft command is missing: install nftables (Debian: apt-get install nftables)"
        )
    try:
        proc = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackendNatError("nft did not finish within 30 seconds") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise BackendNatError(f"nft refused the egress NAT rules: {detail}\n--- script ---\n{script}")
    return proc.stdout


def _nft_table_text() -> str | None:
    if shutil.which("nft") is None:
        return None
    proc = subprocess.run(
        ["nft", "list", "table", NFT_FAMILY, NFT_TABLE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else None


def nft_comment(entry: Entry) -> str:
    return f"convey-dsr {entry.key}"


def nft_rule(entry: Entry) -> str:
    """The rule restoring ``VIP:PORT`` as the source of ``entry``'s replies."""
    skip = [entry.vip, *entry.balancers]
    daddr = skip[0] if len(skip) == 1 else "{ " + ", ".join(skip) + " }"
    parts = [
        f'oifname "{entry.dev}"',
        f"ip saddr {entry.server_addr}",
        f"ip daddr != {daddr}",
        f"tcp sport {entry.server_port}",
        f"ip saddr set {entry.vip}",
    ]
    if entry.server_port != entry.port:
        parts.append(f"tcp sport set {entry.port}")
    parts.append(f'comment "{nft_comment(entry)}"')
    return " ".join(parts)


def nft_script(entries: Sequence[Entry], table_exists: bool) -> str:
    """One atomic nft transaction: our table replaced by one holding ``entries`` (deleted when none)."""
    lines = []
    if table_exists or entries:
        lines += [f"table {NFT_FAMILY} {NFT_TABLE}", f"delete table {NFT_FAMILY} {NFT_TABLE}"]
    if entries:
        lines += [
            f"table {NFT_FAMILY} {NFT_TABLE} {{",
            f"\tchain {NFT_CHAIN} {{",
            f"\t\ttype filter hook postrouting priority {NFT_PRIORITY}; policy accept;",
            *(f"\t\t{nft_rule(e)}" for e in entries),
            "\t}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _nft_sync(entries: Sequence[Entry]) -> None:
    current = _nft_table_text()
    if current is None and not entries:
        return
    _nft(nft_script(entries, current is not None))


def _nft_present(entry: Entry) -> bool:
    text = _nft_table_text()
    return text is not None and f'comment "{nft_comment(entry)}"' in text


# -- tc ------------------------------------------------------------------------------------------------------


def _root_qdisc(ipr: Any, index: int) -> tuple[str, int] | None:
    for msg in ipr.get_qdiscs(index=index):
        if msg["parent"] == TC_ROOT:
            return str(msg.get_attr("TCA_KIND")), int(msg["handle"])
    return None


def _skip_filters(entry: Entry, index: int, slot: int) -> list[Any]:
    from convey.dataplane import tc_nat

    keys = tc_nat.match_ip_sport(tc_nat.match_ip_src((), entry.server_addr), entry.server_port)
    return [
        tc_nat.u32_filter(
            index, TC_QDISC, SKIP_PRIO + slot, tc_nat.match_ip_dst(keys, dst), [tc_nat.gact_action("ok")]
        )
        for dst in (entry.vip, *entry.balancers)
    ]


def _nat_filter(entry: Entry, index: int, slot: int) -> Any:
    from convey.dataplane import tc_nat

    keys = tc_nat.match_ip_sport(tc_nat.match_ip_src((), entry.server_addr), entry.server_port)
    return tc_nat.u32_filter(
        index, TC_QDISC, NAT_PRIO + slot, keys, [tc_nat.nat_action(entry.server_addr, entry.vip)]
    )


def _delete_filters(ipr: Any, index: int, slot: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from convey.dataplane import tc_nat

    for prio in (NAT_PRIO + slot, SKIP_PRIO + slot):
        try:
            ipr.nlm_request(tc_nat.delete_filter(index, TC_QDISC, prio), tc_nat.MSG_DEL, tc_nat.NLM_F_REQ_ACK)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise


def _tc_has_filters(ipr: Any, index: int, slot: int) -> bool:
    prios = {SKIP_PRIO + slot, NAT_PRIO + slot}
    return prios <= {m["info"] >> 16 for m in ipr.get_filters(index=index, parent=TC_QDISC)}


def _tc_install(ipr: Any, entry: Entry, state: State, evidence: str) -> Entry:
    """Add the qdisc (when not ours yet) and the entry's filters; on any failure, remove what was added."""
    from pyroute2.netlink.exceptions import NetlinkError

    from convey.dataplane import tc_nat

    index = _index(ipr, entry.dev)
    used = {e.slot for e in state.entries if e.method == "tc" and e.dev == entry.dev}
    slot = next((s for s in range(TC_SLOTS) if s not in used), None)
    if slot is None:
        raise BackendNatError(f"{entry.dev} already has {TC_SLOTS} tc egress NATs; use --method nft")
    entry = replace(entry, slot=slot)
    created = False
    root = _root_qdisc(ipr, index)
    if entry.dev not in state.qdiscs:
        if root is not None and root[1] != 0:
            raise BackendNatError(
                f"{entry.dev} has a root qdisc {root[0]} {root[1] >> 16:x}: that convey did not add; "
                "the tc recipe needs its own root htb 10: (remove that qdisc, or use --method nft)"
            )
        ipr.tc("add", "htb", index=index, handle=TC_QDISC, default=0)
        created = True
    added = False
    try:
        try:
            ipr.nlm_request(_nat_filter(entry, index, slot), tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL)
            added = True
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EOPNOTSUPP):
                raise TcUnavailable(
                    f"act_nat not available: the kernel refused the nat action ({errno.errorcode[exc.code]}; "
                    f"{evidence})"
                ) from None
            raise
        for msg in _skip_filters(entry, index, slot):
            try:
                ipr.nlm_request(msg, tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL)
            except NetlinkError as exc:
                if exc.code in (errno.ENOENT, errno.EOPNOTSUPP):
                    raise TcUnavailable(
                        f"act_gact not available: the kernel refused `action ok` "
                        f"({errno.errorcode[exc.code]}; {evidence})"
                    ) from None
                raise
    except BaseException:
        with contextlib.suppress(Exception):
            if added:
                _delete_filters(ipr, index, slot)
            if created:
                ipr.tc("del", index=index, handle=TC_QDISC, parent=TC_ROOT)
        raise
    if created:
        state.qdiscs.append(entry.dev)
    return entry


def _tc_remove(ipr: Any, entry: Entry, state: State) -> list[str]:
    lines = []
    found = ipr.link_lookup(ifname=entry.dev)
    if not found:
        lines.append(f"tc: {entry.dev} is gone, and its qdisc and filters with it")
    else:
        index = int(found[0])
        _delete_filters(ipr, index, entry.slot)
        lines.append(
            f"tc: deleted the filters of {entry.key} on {entry.dev} (prio {SKIP_PRIO + entry.slot} and "
            f"{NAT_PRIO + entry.slot})"
        )
    others = [e for e in state.entries if e.method == "tc" and e.dev == entry.dev and e.key != entry.key]
    if not others and entry.dev in state.qdiscs:
        state.qdiscs.remove(entry.dev)
        if found:
            with contextlib.suppress(Exception):
                ipr.tc("del", index=int(found[0]), handle=TC_QDISC, parent=TC_ROOT)
            lines.append(f"tc: deleted root qdisc htb 10: of {entry.dev} (the kernel's default is back)")
    return lines


# -- mac: VIP on lo, ARP sysctls -----------------------------------------------------------------------------


def _arp_keys(dev: str) -> list[tuple[str, str]]:
    return [(sysctl.conf_key(name, key), value) for name in ("all", dev) for key, value in ARP_SETTINGS]


def _mac_install(ipr: Any, entry: Entry, state: State) -> list[str]:
    lines = []
    for key, value in _arp_keys(entry.dev):
        change = sysctl.write(key, value)
        if change is None:
            continue
        lines.append(str(change))
        if key in state.sysctls:
            state.sysctls[key]["new"] = change.new
        else:
            state.sysctls[key] = {"old": change.old, "new": change.new}
    if _lo_has(ipr, entry.vip):
        whose = " (added by convey for another port)" if entry.vip in state.lo_addrs else ""
        lines.append(f"lo already holds {entry.vip}/32{whose}")
    else:
        ipr.addr("add", index=_index(ipr, "lo"), address=entry.vip, prefixlen=32)
        state.lo_addrs.append(entry.vip)
        lines.append(f"ip addr add {entry.vip}/32 dev lo")
    return lines


def _mac_remove(ipr: Any, entry: Entry, state: State) -> list[str]:
    lines = []
    others = [e for e in state.entries if e.rewrite == "mac" and e.key != entry.key]
    if entry.vip in state.lo_addrs and not any(e.vip == entry.vip for e in others):
        state.lo_addrs.remove(entry.vip)
        if _lo_has(ipr, entry.vip):
            ipr.addr("del", index=_index(ipr, "lo"), address=entry.vip, prefixlen=32)
            lines.append(f"ip addr del {entry.vip}/32 dev lo")
    if not others:
        for key, values in reversed(list(state.sysctls.items())):
            del state.sysctls[key]
            if not sysctl.exists(key):
                continue
            now = sysctl.read(key)
            if now != values["new"]:
                lines.append(
                    f"sysctl {key}: left at {now} (set to {values['new']} by install; changed since)"
                )
                continue
            change = sysctl.write(key, values["old"])
            if change is not None:
                lines.append(str(change))
    return lines


# -- the API -------------------------------------------------------------------------------------------------


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
    method: str = "auto",
    server_addr: str | None = None,
    balancers: Sequence[str] = (),
) -> Entry:
    """The entry an install with these arguments describes (arguments checked, defaults not resolved yet)."""
    if rewrite not in REWRITES:
        raise BackendNatError(f"--rewrite must be one of {', '.join(REWRITES)}, got {rewrite!r}")
    if method not in METHODS:
        raise BackendNatError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    vip = _check_ipv4(vip, "--vip")
    port = _check_port(port, "--port")
    sport = _check_port(server_port, "--server-port") if server_port is not None else port
    if rewrite == "ip" and method == "tc" and sport != port:
        raise BackendNatError(
            f"--server-port {sport} differs from --port {port}: tc's nat action rewrites addresses only and "
            "cannot restore the port (use --method nft or auto, or the same port)"
        )
    return Entry(
        rewrite=rewrite,
        vip=vip,
        port=port,
        server_port=sport if rewrite == "ip" else port,
        server_addr=_check_ipv4(server_addr, "--server-addr") if server_addr else "",
        dev=dev or "",
        method=method if rewrite == "ip" else "",
        balancers=tuple(_check_ipv4(b, "--balancer") for b in balancers) if rewrite == "ip" else (),
    )


def _resolve(ipr: Any, entry: Entry) -> Entry:
    dev = entry.dev or default_dev(ipr)
    _index(ipr, dev)
    if entry.rewrite == "mac":
        return replace(entry, dev=dev)
    server_addr = entry.server_addr or primary_addr(ipr, dev)
    if server_addr == entry.vip:
        raise BackendNatError(f"the server address {server_addr} is the VIP: give --server-addr")
    return replace(entry, dev=dev, server_addr=server_addr)


def install(entry: Entry, state_dir: Path | None = None) -> list[str]:
    """Install ``entry`` (from :func:`plan`); idempotent. Returns what happened, one line each."""
    path = state_path(state_dir)
    state = load_state(path)
    lines: list[str] = []
    with _iproute() as ipr:
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
            if entry.rewrite == "mac":
                lines += _mac_install(ipr, entry, state)
            else:
                entry, more = _install_ip(ipr, entry, state)
                lines += more
            state.entries.append(entry)
        finally:
            save_state(path, state)
    return lines


def _compatible(old: Entry, new: Entry) -> bool:
    """An installed entry satisfies a new request (``auto`` accepts whatever method was chosen)."""
    if new.method == "auto":
        return old.same_as(replace(new, method=old.method))
    return old.same_as(new)


def _present(ipr: Any, entry: Entry) -> bool:
    if entry.rewrite == "mac":
        return _lo_has(ipr, entry.vip) and all(
            sysctl.exists(k) and sysctl.read(k) == v for k, v in _arp_keys(entry.dev)
        )
    if entry.method == "nft":
        return _nft_present(entry)
    found = ipr.link_lookup(ifname=entry.dev)
    return bool(found) and _tc_has_filters(ipr, int(found[0]), entry.slot)


def _describe(entry: Entry) -> str:
    if entry.rewrite == "mac":
        return f"mac: {entry.vip}/32 on lo, arp_ignore=1 arp_announce=2 on all and {entry.dev}"
    ports = f"{entry.server_port}->{entry.port}" if entry.server_port != entry.port else str(entry.port)
    return f"ip: {entry.method} egress NAT on {entry.dev}: {entry.server_addr} -> {entry.vip}, port {ports}"


def _install_ip(ipr: Any, entry: Entry, state: State) -> tuple[Entry, list[str]]:
    lines: list[str] = []
    method = entry.method
    if method == "auto":
        if entry.server_port != entry.port:
            method, why = "nft", "the ports differ and tc's nat action cannot restore ports"
        else:
            ok, headline, evidence = tc_support()
            if ok is False:
                method, why = "nft", f"{headline}: {evidence}"
            else:
                try:
                    entry = _tc_install(ipr, replace(entry, method="tc"), state, evidence)
                except TcUnavailable as exc:
                    method, why = "nft", str(exc)
                else:
                    lines.append(f"method: tc (auto: {evidence})")
                    lines.append(_tc_lines(entry))
                    return entry, lines
        lines.append(f"method: nft (auto: {why})")
    elif method == "tc":
        _, _, evidence = tc_support()
        try:
            entry = _tc_install(ipr, entry, state, evidence)
        except TcUnavailable as exc:
            raise TcUnavailable(f"tc egress NAT impossible here: {exc}. Use --method nft (or auto)") from None
        lines.append(f"method: tc (as asked; {evidence})")
        lines.append(_tc_lines(entry))
        return entry, lines
    else:
        lines.append("method: nft (as asked)")
    entry = replace(entry, method="nft")
    _nft_sync([*(e for e in state.entries if e.method == "nft"), entry])
    lines.append(f"nft: table {NFT_FAMILY} {NFT_TABLE} chain {NFT_CHAIN}: {nft_rule(entry)}")
    return entry, lines


def _tc_lines(entry: Entry) -> str:
    return (
        f"tc: {entry.dev}: qdisc root handle 10: htb; filter prio {SKIP_PRIO + entry.slot} u32 "
        f"(src {entry.server_addr} sport {entry.server_port} dst {'|'.join((entry.vip, *entry.balancers))}) "
        f"action ok; filter prio {NAT_PRIO + entry.slot} u32 (src {entry.server_addr} sport "
        f"{entry.server_port}) action nat egress {entry.server_addr} {entry.vip}"
    )


def _remove_entry(ipr: Any, entry: Entry, state: State) -> list[str]:
    if entry.rewrite == "mac":
        return _mac_remove(ipr, entry, state)
    if entry.method == "tc":
        return _tc_remove(ipr, entry, state)
    _nft_sync([e for e in state.entries if e.method == "nft" and e.key != entry.key])
    return [f"nft: removed the rule for {entry.key} from table {NFT_FAMILY} {NFT_TABLE}"]


def remove(vip: str, port: int, state_dir: Path | None = None) -> list[str]:
    """Undo what install did for ``VIP:PORT``; fine when nothing is installed (says so)."""
    key = f"{_check_ipv4(vip, '--vip')}:{_check_port(port, '--port')}"
    path = state_path(state_dir)
    state = load_state(path)
    entry = state.find(key)
    if entry is None:
        return [f"{key}: nothing installed (no record in {path}), nothing to remove"]
    with _iproute() as ipr:
        try:
            lines = _remove_entry(ipr, entry, state)
        finally:
            state.entries.remove(entry)
            save_state(path, state)
    return lines


def show(state_dir: Path | None = None) -> list[str]:
    state = load_state(state_path(state_dir))
    if not state.entries:
        return ["nothing installed"]
    return [f"{e.key}: {_describe(e)}" for e in state.entries]


# -- command line --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="setup-dsr-backend.sh",
        description="Prepare (or unprepare) this server for convey's DSR mode, in the current network namespace. "
        'rewrite "ip": an egress NAT putting VIP:PORT back as the source of the replies (tc act_nat or '
        'nftables); rewrite "mac": the VIP on lo with ARP announcements suppressed. Idempotent; remove '
        "restores exactly what install changed. Needs root.",
    )
    p.add_argument("action", choices=("install", "remove", "show"))
    p.add_argument("--vip", help="the virtual IP clients connect to (required for install and remove)")
    p.add_argument("--port", type=int, help="the VIP's port (required for install and remove)")
    p.add_argument(
        "--server-port",
        type=int,
        help="the port this server listens on, when it differs from --port (rewrite ip; needs nft)",
    )
    p.add_argument("--rewrite", default="ip", choices=REWRITES, help="the balancer's [dsr] rewrite [ip]")
    p.add_argument(
        "--dev",
        help="the interface the replies leave by (ip) / that must not answer ARP for the VIP (mac) "
        "[the default route's interface, or the only one with an address]",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=METHODS,
        help="egress NAT for rewrite ip: tc (act_nat), nft, or auto (tc when possible) [auto]",
    )
    p.add_argument(
        "--server-addr", help="this server's address the balancer sends to [the first address of --dev]"
    )
    p.add_argument(
        "--balancer",
        action="append",
        default=[],
        metavar="ADDR",
        help="the balancer's address: replies to it (health checks) keep the server's address; repeatable",
    )
    p.add_argument("--state-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.action != "show" and (args.vip is None or args.port is None):
        print(f"setup-dsr-backend: {args.action} needs --vip and --port", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print(
            "setup-dsr-backend: must run as root (it changes sysctls, addresses, tc or nftables)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        if args.action == "show":
            lines = show(args.state_dir)
        elif args.action == "remove":
            lines = remove(args.vip, args.port, args.state_dir)
        else:
            entry = plan(
                args.rewrite,
                args.vip,
                args.port,
                args.server_port,
                args.dev,
                args.method,
                args.server_addr,
                args.balancer,
            )
            lines = install(entry, args.state_dir)
    except (BackendNatError, sysctl.SysctlError) as exc:
        print(f"setup-dsr-backend: {args.action} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"setup-dsr-backend: {args.action} failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ImportError as exc:
        print(
            f"setup-dsr-backend: {exc.name or exc} is missing: install convey's dependencies "
            "(pip install -e . in the repository, or make venv)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    for line in lines:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
