"""Does this kernel have what offload needs? ``missing()`` lists what it lacks, each with how to get it;
``require()`` turns a non-empty list into one ``OffloadUnavailable`` (a ConveyError: the CLI prints it, no
traceback). Run it in the namespace convey runs in (conntrack and its sysctls are per namespace).

What offload uses (iptables-nft rules, see /tmp/team/offload-findings.md):
- connection tracking with its netlink interface (events, dumps, entries made by convey for DSR) and accounting;
- NAT (passthrough: DNAT and SNAT by mark; DSR ``ip``: DNAT carried by the entry);
- connmark (the mark naming the server lives in the entry) and the xtables pieces of the rules: the
  ``conntrack``, ``connmark`` and ``mark`` matches, the ``NFQUEUE``, ``CONNMARK``, ``DNAT``, ``SNAT`` and ``CT``
  targets.

The xtables extensions a kernel has are listed in /proc/net/ip_tables_{matches,targets} once registered: built in
ones always, modules once loaded. An extension that is not listed is looked for among the kernel's modules
(``modprobe -n``); a missing sysctl file means the feature is not built at all.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from convey.errors import ConveyError

__all__ = ["Missing", "OffloadUnavailable", "missing", "modprobe_dry_run", "require"]


class OffloadUnavailable(ConveyError):
    """The kernel lacks something offload needs; the message names each piece and how to get it."""


@dataclass(frozen=True, slots=True)
class Missing:
    what: str  # e.g. "xtables target CONNMARK"
    why: str  # what offload uses it for
    how: str  # how to get it

    def __str__(self) -> str:
        return f"{self.what} ({self.why}): {self.how}"


# name, module, kernel option, why
_MATCHES = (
    (
        "conntrack",
        "xt_conntrack",
        "CONFIG_NETFILTER_XT_MATCH_CONNTRACK",
        "queue only a connection's first packet",
    ),
    ("connmark", "xt_connmark", "CONFIG_NETFILTER_XT_MATCH_CONNMARK", "skip connections already decided"),
    ("mark", "xt_mark", "CONFIG_NETFILTER_XT_MARK", "DNAT/SNAT by the mark of the verdict"),
)
_TARGETS = (
    ("NFQUEUE", "xt_NFQUEUE", "CONFIG_NETFILTER_XT_TARGET_NFQUEUE", "hand first packets to convey"),
    ("CONNMARK", "xt_connmark", "CONFIG_NETFILTER_XT_CONNMARK", "keep the server's mark in the connection"),
    ("DNAT", "xt_nat", "CONFIG_NETFILTER_XT_NAT", "send the connection to its server"),
    ("SNAT", "xt_nat", "CONFIG_NETFILTER_XT_NAT", "passthrough: the balancer's source address"),
    (
        "MASQUERADE",
        "xt_MASQUERADE",
        "CONFIG_NETFILTER_XT_TARGET_MASQUERADE",
        "passthrough: the route's source address",
    ),
    (
        "CT",
        "xt_CT",
        "CONFIG_NETFILTER_XT_TARGET_CT",
        "passthrough: events of a close only; DSR: keep SYNs out of conntrack",
    ),
)
# sysctl file under /proc/sys/net/netfilter, module, kernel option, why
_SYSCTLS = (
    (
        "nf_conntrack_max",
        "nf_conntrack",
        "CONFIG_NF_CONNTRACK",
        "connection tracking carries the connections",
    ),
    ("nf_conntrack_acct", "nf_conntrack", "CONFIG_NF_CONNTRACK", "byte and packet counters per connection"),
    (
        "nf_conntrack_events",
        "nf_conntrack",
        "CONFIG_NF_CONNTRACK_EVENTS",
        "learn opens and closes from the kernel",
    ),
)


def modprobe_dry_run(module: str) -> bool:
    """True if ``modprobe -n`` finds ``module`` (it exists as a module of this kernel)."""
    try:
        done = subprocess.run(["modprobe", "-n", "-q", module], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _how(module: str, option: str) -> str:
    return f"load it with `modprobe {module}`, or use a kernel built with {option}"


def _listed(path: Path) -> set[str] | None:
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except OSError:
        return None


def missing(
    proc: Path = Path("/proc"),
    loadable: Callable[[str], bool] = modprobe_dry_run,
    ctnetlink: Callable[[], str | None] | None = None,
    need: Iterable[str] = ("NFQUEUE", "CONNMARK", "DNAT", "SNAT", "CT"),
) -> list[Missing]:
    """What is missing for offload (empty: nothing). ``need`` narrows the targets (DSR ``mac`` needs no NAT).
    ``ctnetlink`` probes the netlink interface and returns an error text, or None when it answers."""
    found: list[Missing] = []
    for name, module, option, why in _SYSCTLS:
        if not (proc / "sys/net/netfilter" / name).exists() and not loadable(module):
            found.append(Missing(f"sysctl net.netfilter.{name}", why, _how(module, option)))
    if found:  # no conntrack at all: the rest would only repeat it
        return found
    wanted = set(need)
    for kind, table, entries in (
        ("match", "ip_tables_matches", _MATCHES),
        ("target", "ip_tables_targets", [t for t in _TARGETS if t[0] in wanted]),
    ):
        listed = _listed(proc / "net" / table) or set()
        for name, module, option, why in entries:
            if name not in listed and not loadable(module):
                found.append(Missing(f"xtables {kind} {name}", why, _how(module, option)))
    if ctnetlink is not None:
        error = ctnetlink()
        if error is not None:
            found.append(
                Missing(
                    "conntrack netlink interface",
                    f"events, dumps and entries for DSR ({error})",
                    _how("nf_conntrack_netlink", "CONFIG_NF_CT_NETLINK"),
                )
            )
    return found


def require(found: list[Missing], what: str = "offload") -> None:
    """Raise ``OffloadUnavailable`` naming everything in ``found``."""
    if found:
        lines = "\n".join(f"  - {m}" for m in found)
        raise OffloadUnavailable(f"{what} needs kernel features this system lacks:\n{lines}")
