"""Kernel state for the packet modes: iptables rules, sysctls and (DSR ``rewrite = "mac"``) policy routing.

The one entry point the data plane and the CLI use; the seams live in modules of their own:

- :mod:`.ruleset` renders the rule set from a config (pure, unit-tested): :func:`render`, :func:`show`,
  :func:`chain_rules`, :func:`server_marks`; :mod:`.offload` the flow offload rule sets (mangle/nat, and raw
  for DSR) and their mark plan, :class:`OffloadPlan` / :func:`offload_plan` (pure); :mod:`.offload_kernel`
  checks the kernel has what offload needs;
- :mod:`.iptables` loads it with ``iptables-restore --noflush`` and reads it back with ``iptables-save``;
- :mod:`.sysctls` decides, sets and restores the sysctls; :mod:`.routing` the DSR mac policy routing;
- :mod:`convey.dataplane.kernel_state` keeps the record of what changed.

Everything :func:`install` changes besides the iptables chain (sysctls, ip rules, routes) is recorded with its
old value in ``/run/convey/<netns name or "host">.json``, and :func:`remove` puts back exactly what install
changed (a sysctl someone has changed since is left alone and reported). ``/run`` is a tmpfs, so the state file
lives as long as the kernel state it describes. Every expected failure is a :class:`RulesError`,
:class:`~convey.config.ConfigError` or another :class:`~convey.errors.ConveyError` with a message to show.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convey.config import Config, offloaded, workers_for
from convey.dataplane import kernel_state
from convey.dataplane.kernel_state import StateFile
from convey.dataplane.rules import byte_counters, iptables, offload, routing, ruleset, sysctls
from convey.dataplane.rules.offload import OffloadPlan, offload_plan
from convey.dataplane.rules.offload_kernel import require_kernel
from convey.dataplane.rules.ruleset import (
    CHAIN,
    HOOK,
    JUMP_RULE,
    MODES,
    TABLE,
    RulesError,
    chain_rules,
    packet_mode,
    server_marks,
    uses_marks,
)
from convey.errors import ConveyError, StartupError
from convey.modes import Mode, Rewrite

__all__ = [
    "CHAIN",
    "HOOK",
    "JUMP_RULE",
    "MODES",
    "TABLE",
    "OffloadPlan",
    "RulesError",
    "chain_rules",
    "ensure",
    "install",
    "installed_rules",
    "offload_plan",
    "present",
    "problems",
    "remove",
    "render",
    "server_marks",
    "show",
    "state_file",
]

log = logging.getLogger(__name__)


def state_file(state_dir: Path | None = None) -> StateFile:
    """``<state_dir or /run/convey>/<netns name or "host">.json``."""
    return StateFile.here(state_dir)


def _load(state: StateFile) -> dict[str, Any]:
    doc = state.load() or {}
    doc.setdefault("sysctls", {})
    doc.setdefault("routing", {})
    return doc


def _wanted(config: Config, mode: Mode, plan: OffloadPlan | None) -> dict[offload.ChainKey, list[str]]:
    """The rules of each chain ``mode`` uses (validates the VIPs): offload's chains or the per-packet one."""
    if offloaded(config, mode):
        return offload.chains(config, mode, plan)
    return ruleset.chains(config, mode)


def _labels(config: Config, mode: Mode) -> tuple[str, str]:
    kind = f"{mode} offload" if offloaded(config, mode) else str(mode)
    return f"{kind} mode", f"{kind} rules for {config.path}"


def _host_marks(config: Config, mode: Mode, plan: OffloadPlan | None) -> dict[str, int] | None:
    """DSR mac with offload: the plan's marks per server address, so the policy routing keeps them."""
    if not offloaded(config, mode):
        return None
    return offload.host_marks(config, plan if plan is not None else offload_plan(config, mode))


def _byte_counters(config: Config, mode: Mode, plan: OffloadPlan | None) -> tuple[int, int] | None:
    """Passthrough offload: the byte counters' (ours mask, key mask) for ``plan``; None for other modes."""
    if mode != Mode.PASSTHROUGH or not offloaded(config, mode):
        return None
    plan = plan if plan is not None else offload_plan(config, mode)
    return offload.SERVER_FIELD, offload.byte_key_mask(plan)


def render(config: Config, mode: str, plan: OffloadPlan | None = None) -> str:
    """``mode``'s rule set as ``iptables-restore --noflush`` input (offload's when the config asks for it)."""
    if offloaded(config, mode):
        return offload.render(config, mode, plan)
    return ruleset.render(config, mode)


def show(config: Config, mode: str, plan: OffloadPlan | None = None) -> str:
    """:func:`render` with comments saying what else install does (sysctls, policy routing, marks)."""
    if offloaded(config, mode):
        return offload.show(config, mode, plan)
    return ruleset.show(config, mode)


def install(
    config: Config, mode: str, *, state_dir: Path | None = None, plan: OffloadPlan | None = None
) -> list[str]:
    """Install (or replace) the convey rule set for ``mode``; idempotent. Returns what changed, one line each.

    Order: sysctls, then policy routing, then iptables last, so traffic is diverted only once the rest is
    ready. Problems found first (iptables missing or unusable, a 0.0.0.0 VIP, a DSR mac server not on-link,
    ip rules or tables in the way, with offload a kernel without conntrack, NAT or connmark) raise
    ConfigError, RulesError or OffloadUnavailable and change nothing. With offload, ``plan`` (None: the
    config's :func:`offload_plan`) gives the marks; a reload re-installs with the plane's plan in one
    transaction, and established connections keep their NAT and marks (they live in conntrack).
    """
    mode = packet_mode(mode)
    wanted = _wanted(config, mode, plan)  # validates the VIPs before anything changes
    iptables.check_tools()
    offload_on = offloaded(config, mode)
    if offload_on:
        require_kernel(config, mode)
    path = state_file(state_dir)
    state = _load(path)
    lines: list[str] = []
    mac = uses_marks(config, mode)
    with kernel_state.iproute(f"rules install ({mode})") as ipr:
        marks = _host_marks(config, mode, plan)
        planned = routing.check(ipr, config, state["routing"], marks) if mac else []
        ifaces, warnings = routing.involved_ifaces(ipr, config)
        lines += warnings
        originals = {key: values["old"] for key, values in state["sysctls"].items()}
        try:
            want = sysctls.wanted(config, mode, ifaces, originals, offload=offload_on)
            lines += sysctls.install(want, state["sysctls"])
            if mac:
                lines += routing.install(ipr, planned, state["routing"])
            else:
                lines += routing.remove(ipr, state["routing"])
        finally:
            state["mode"] = mode
            state["config"] = config.path
            path.save(state)
    counters = _byte_counters(config, mode, plan)
    # passthrough offload's byte counters before the rules that mark connections: every packet is counted
    lines += byte_counters.install(*counters) if counters is not None else byte_counters.remove()
    lines += iptables.install(wanted, _labels(config, mode)[0])
    for line in lines:
        log.info("rules install: %s", line)
    return lines


def remove(config: Config | None = None, *, state_dir: Path | None = None) -> list[str]:
    """Remove our jump rule and chain and undo what install changed, nothing else; fine when nothing is there.

    The recorded state says what to undo. Without it (a lost state file), a given ``config`` lets remove find
    the DSR policy routing install would have added; sysctls are then left as they are.
    """
    lines = iptables.remove()
    lines += byte_counters.remove()
    path = state_file(state_dir)
    state = _load(path)
    with kernel_state.iproute("rules remove") as ipr:
        if not path.exists() and config is not None and config.dsr.rewrite == Rewrite.MAC:
            state["routing"] = routing.guess(ipr, config)
        lines += routing.remove(ipr, state["routing"])
    lines += kernel_state.restore_recorded(state["sysctls"])
    path.remove()
    for line in lines:
        log.info("rules remove: %s", line)
    return lines


def problems(config: Config, mode: str, plan: OffloadPlan | None = None) -> list[str]:
    """What is missing for ``mode`` with this config; empty when the rule set is fully in place.

    With offload, a kernel lacking what it needs raises OffloadUnavailable (a ConveyError naming each
    missing piece and how to get it): no install can fix that.
    """
    mode = packet_mode(mode)
    offload_on = offloaded(config, mode)
    if offload_on:
        require_kernel(config, mode)
    label = _labels(config, mode)[1]
    found = iptables.problems(_wanted(config, mode, plan), label)
    found += sysctls.problems(config, mode, offload=offload_on)
    counters = _byte_counters(config, mode, plan)
    if counters is not None:
        found += byte_counters.problems(counters[1])
    if uses_marks(config, mode):
        with kernel_state.iproute("rules check") as ipr:
            found += routing.problems(ipr, config, _host_marks(config, mode, plan))
    return found


def ensure(
    config: Config, mode: str, install_rules: bool, at_start: bool, plan: OffloadPlan | None = None
) -> bool:
    """Check ``mode``'s rules for ``config`` and install them when they are off: at start only with
    ``install_rules`` (else a StartupError saying how), on reload always. True when rules were installed at start
    (so the caller removes them at exit)."""
    found = problems(config, mode, plan)
    if not found:
        return False
    offload_on = offloaded(config, mode)
    count = workers_for(config, mode)
    if at_start and not install_rules:
        flags = (" --offload" if offload_on else "") + (f" --workers={count}" if count > 1 else "")
        make_flags = (" OFFLOAD=1" if offload_on else "") + (f" WORKERS={count}" if count > 1 else "")
        raise StartupError(
            "the kernel is not set up for this config: "
            + "; ".join(found)
            + f".\nRun, in this network namespace:  convey rules install --config={config.path} --{mode}{flags}"
            + f"\n(or: make install-rules CONFIG={config.path} MODE={mode}{make_flags}), or start convey with "
            "--install-rules to install them now and remove them at exit."
        )
    try:
        lines = install(config, mode, plan=plan)
    except (OSError, ConveyError) as exc:
        raise StartupError(f"installing the {mode} rules failed: {exc}") from None
    for line in lines:
        log.info("event=rules_installed change=%r", line)
    return at_start


def present(config: Config, mode: str, plan: OffloadPlan | None = None) -> bool:
    """True when our chains hold the expected rules (and sysctls and policy routing are in place)."""
    return not problems(config, mode, plan)


def installed_rules() -> Iterator[str]:
    """Our jump rules and chain rules as iptables-save shows them now."""
    yield from iptables.installed()
