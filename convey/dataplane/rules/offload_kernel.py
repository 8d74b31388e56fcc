"""Does this kernel have what flow offload needs? Checked by ``rules.install`` and ``rules.problems`` (which the
planes call at start) before anything changes, in the current network namespace.

The ``net.netfilter`` sysctls offload sets exist only once the nf_conntrack module is loaded: when they are
missing it is loaded (``modprobe nf_conntrack``) first. What is still missing then (conntrack, NAT, connmark, an
xtables match or target, the conntrack netlink interface) raises one
:class:`~convey.dataplane.conntrack_check.OffloadUnavailable` naming each piece and how to get it.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path

from convey.config import Config
from convey.dataplane import conntrack, conntrack_check
from convey.dataplane.rules import byte_counters
from convey.dataplane.rules.ruleset import uses_marks
from convey.modes import Mode

CONNTRACK_SYSCTL = "sys/net/netfilter/nf_conntrack_acct"


def needed_targets(config: Config, mode: Mode) -> tuple[str, ...]:
    """The xtables targets ``mode``'s offload rules use (DNAT also stands for the nat table)."""
    if mode == Mode.PASSTHROUGH:
        snat = "SNAT" if config.passthrough.source_addrs else "MASQUERADE"
        return ("NFQUEUE", "CONNMARK", "CT", "DNAT", snat)
    if uses_marks(config, mode):
        return ("NFQUEUE", "CONNMARK", "CT")
    return ("NFQUEUE", "CONNMARK", "CT", "DNAT")


def load_conntrack(proc: Path = Path("/proc")) -> None:
    """Load nf_conntrack when its sysctls are missing (a module not loaded yet); failures are left to the
    check that follows, which says what is missing."""
    if (proc / CONNTRACK_SYSCTL).exists():
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "-q", "nf_conntrack"], capture_output=True, timeout=30, check=False)


def require_kernel(
    config: Config,
    mode: Mode,
    *,
    proc: Path = Path("/proc"),
    load: Callable[[Path], None] = load_conntrack,
    loadable: Callable[[str], bool] = conntrack_check.modprobe_dry_run,
    ctnetlink: Callable[[], str | None] | None = conntrack.probe,
    nft_found: Callable[[], bool] = byte_counters.available,
) -> None:
    """Raise OffloadUnavailable unless this kernel (namespace) has everything ``mode``'s offload uses."""
    load(proc)
    found = conntrack_check.missing(proc, loadable, ctnetlink, need=needed_targets(config, mode))
    if mode == Mode.PASSTHROUGH and not nft_found():
        found.append(
            conntrack_check.Missing(
                "the nft tool",
                "passthrough offload counts each connection's bytes in an nftables set",
                "install nftables (apt install nftables; kernel: CONFIG_NF_TABLES, nft_ct, nft_dynset)",
            )
        )
    conntrack_check.require(found, f"--{mode} --offload")
