"""Egress NAT with tc, as the original convey's recipe: on the device, ``qdisc root handle 10: htb``, a u32 filter at
prio 1 with ``action ok`` for replies to the VIP itself (and to each ``--balancer`` address), and one at prio 10
with ``action nat egress SERVER VIP``. Needs the kernel's ``act_nat`` and ``act_gact``; rewrites addresses only,
so the server port must equal the VIP's. The filters are built with pyroute2 (:mod:`convey.backend.tc_nat`).

A second VIP on the same device takes the next slot: prios 2 and 11, and so on (:data:`TC_SLOTS` per device).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import platform
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from convey.backend import links
from convey.backend.state import BackendNatError, Entry, Method, State

TC_QDISC = 0x100000  # "10:"
TC_ROOT = 0xFFFFFFFF
SKIP_PRIO = 1  # slot s uses prio SKIP_PRIO + s for its "action ok" filters ...
NAT_PRIO = 10  # ... and NAT_PRIO + s for its nat filter: slot 0 is exactly the original recipe
TC_SLOTS = NAT_PRIO - SKIP_PRIO  # so every skip filter comes before every nat filter
UNSUPPORTED = (errno.ENOENT, errno.EOPNOTSUPP)  # what the kernel answers for an action it does not have


class TcUnavailable(BackendNatError):
    """The kernel cannot do the tc recipe (no act_nat or act_gact)."""


# -- what the kernel has -------------------------------------------------------------------------------------


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


# -- filters -------------------------------------------------------------------------------------------------


def _root_qdisc(ipr: Any, index: int) -> tuple[str, int] | None:
    for msg in ipr.get_qdiscs(index=index):
        if msg["parent"] == TC_ROOT:
            return str(msg.get_attr("TCA_KIND")), int(msg["handle"])
    return None


def _skip_filters(entry: Entry, index: int, slot: int) -> list[Any]:
    from convey.backend import tc_nat

    keys = tc_nat.match_ip_sport(tc_nat.match_ip_src((), entry.server_addr), entry.server_port)
    return [
        tc_nat.u32_filter(
            index, TC_QDISC, SKIP_PRIO + slot, tc_nat.match_ip_dst(keys, dst), [tc_nat.gact_action("ok")]
        )
        for dst in dict.fromkeys((entry.vip, *entry.balancers))
    ]


def _nat_filter(entry: Entry, index: int, slot: int) -> Any:
    from convey.backend import tc_nat

    keys = tc_nat.match_ip_sport(tc_nat.match_ip_src((), entry.server_addr), entry.server_port)
    return tc_nat.u32_filter(
        index, TC_QDISC, NAT_PRIO + slot, keys, [tc_nat.nat_action(entry.server_addr, entry.vip)]
    )


def _delete_filters(ipr: Any, index: int, slot: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from convey.backend import tc_nat

    for prio in (NAT_PRIO + slot, SKIP_PRIO + slot):
        try:
            ipr.nlm_request(tc_nat.delete_filter(index, TC_QDISC, prio), tc_nat.MSG_DEL, tc_nat.NLM_F_REQ_ACK)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise


def has_filters(ipr: Any, entry: Entry) -> bool:
    found = ipr.link_lookup(ifname=entry.dev)
    if not found:
        return False
    prios = {SKIP_PRIO + entry.slot, NAT_PRIO + entry.slot}
    return prios <= {m["info"] >> 16 for m in ipr.get_filters(index=int(found[0]), parent=TC_QDISC)}


def _add_filter(ipr: Any, msg: Any, what: str, evidence: str) -> None:
    """Send one filter; the kernel's "no such action" becomes TcUnavailable naming ``what``."""
    from pyroute2.netlink.exceptions import NetlinkError

    from convey.backend import tc_nat

    try:
        ipr.nlm_request(msg, tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL)
    except NetlinkError as exc:
        if exc.code in UNSUPPORTED:
            raise TcUnavailable(f"{what} ({errno.errorcode[exc.code]}; {evidence})") from None
        raise


def _free_slot(entry: Entry, state: State) -> int:
    used = {e.slot for e in state.entries if e.method == Method.TC and e.dev == entry.dev}
    slot = next((s for s in range(TC_SLOTS) if s not in used), None)
    if slot is None:
        raise BackendNatError(f"{entry.dev} already has {TC_SLOTS} tc egress NATs; use --method nft")
    return slot


def install(ipr: Any, entry: Entry, state: State, evidence: str) -> Entry:
    """Add the qdisc (when not ours yet) and the entry's filters; on any failure, remove what was added."""
    index = links.index(ipr, entry.dev)
    entry = replace(entry, method=Method.TC, slot=_free_slot(entry, state))
    created = False
    if entry.dev not in state.qdiscs:
        root = _root_qdisc(ipr, index)
        if root is not None and root[1] != 0:
            raise BackendNatError(
                f"{entry.dev} has a root qdisc {root[0]} {root[1] >> 16:x}: that convey did not add; "
                "the tc recipe needs its own root htb 10: (remove that qdisc, or use --method nft)"
            )
        ipr.tc("add", "htb", index=index, handle=TC_QDISC, default=0)
        created = True
    added = False
    try:
        nat = "act_nat not available: the kernel refused the nat action"
        _add_filter(ipr, _nat_filter(entry, index, entry.slot), nat, evidence)
        added = True
        for msg in _skip_filters(entry, index, entry.slot):
            _add_filter(ipr, msg, "act_gact not available: the kernel refused `action ok`", evidence)
    except BaseException:
        with contextlib.suppress(Exception):
            if added:
                _delete_filters(ipr, index, entry.slot)
            if created:
                ipr.tc("del", index=index, handle=TC_QDISC, parent=TC_ROOT)
        raise
    if created:
        state.qdiscs.append(entry.dev)
    return entry


def remove(ipr: Any, entry: Entry, state: State) -> list[str]:
    """Delete the entry's filters, and our qdisc with the device's last entry."""
    lines = []
    found = ipr.link_lookup(ifname=entry.dev)
    if not found:
        lines.append(f"tc: {entry.dev} is gone, and its qdisc and filters with it")
    else:
        _delete_filters(ipr, int(found[0]), entry.slot)
        lines.append(
            f"tc: deleted the filters of {entry.key} on {entry.dev} (prio {SKIP_PRIO + entry.slot} and "
            f"{NAT_PRIO + entry.slot})"
        )
    others = [e for e in state.entries if e.method == Method.TC and e.dev == entry.dev and e.key != entry.key]
    if not others and entry.dev in state.qdiscs:
        state.qdiscs.remove(entry.dev)
        if found:
            with contextlib.suppress(Exception):
                ipr.tc("del", index=int(found[0]), handle=TC_QDISC, parent=TC_ROOT)
            lines.append(f"tc: deleted root qdisc htb 10: of {entry.dev} (the kernel's default is back)")
    return lines


def describe(entry: Entry) -> str:
    return (
        f"tc: {entry.dev}: qdisc root handle 10: htb; filter prio {SKIP_PRIO + entry.slot} u32 "
        f"(src {entry.server_addr} sport {entry.server_port} dst {'|'.join((entry.vip, *entry.balancers))}) "
        f"action ok; filter prio {NAT_PRIO + entry.slot} u32 (src {entry.server_addr} sport "
        f"{entry.server_port}) action nat egress {entry.server_addr} {entry.vip}"
    )
