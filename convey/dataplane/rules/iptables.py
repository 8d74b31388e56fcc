"""Loading the rule set into the kernel and reading it back: ``iptables-restore --noflush`` and ``iptables-save``.

Only our chain and our one jump rule are ever written; an nft dump is never used (iptables-nft rules cannot be
loaded back from one). See ``iptables/README.md`` for the why. Every failure of the tools is a
:class:`~convey.dataplane.rules.ruleset.RulesError` that says which command failed and what it printed.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from convey.config import Config
from convey.dataplane.rules.ruleset import (
    CHAIN,
    HOOK,
    JUMP_COMMENT,
    JUMP_RULE,
    TABLE,
    RulesError,
    chain_rules,
)

log = logging.getLogger(__name__)

TIMEOUT = 60.0
MISSING = "{tool} not found: install iptables (the nft variant, iptables-nft)"


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise RulesError(MISSING.format(tool=argv[0])) from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{argv[0]} did not finish within {TIMEOUT:g} seconds") from None
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise RulesError(f"{' '.join(argv)} failed: {detail}")
    return proc.stdout


def _restore(text: str) -> None:
    log.debug("iptables-restore --noflush input:\n%s", text)
    _run(["iptables-restore", "--noflush"], stdin=text)


@dataclass(slots=True)
class Current:
    """What iptables-save shows of ours in the raw table."""

    chain_exists: bool = False
    jumps: list[str] = field(default_factory=list)  # every PREROUTING rule jumping to CHAIN, as saved
    rules: list[str] = field(default_factory=list)  # the rules of CHAIN, as saved


def tokens(rule: str) -> list[str]:
    return shlex.split(rule)


def current() -> Current:
    """Our chain and jumps as the kernel has them now (RulesError when iptables-save is missing or fails)."""
    found = Current()
    for line in _run(["iptables-save", "-t", TABLE]).splitlines():
        if line.startswith(f":{CHAIN} "):
            found.chain_exists = True
        elif line.startswith(f"-A {CHAIN} "):
            found.rules.append(line)
        elif line.startswith(f"-A {HOOK} "):
            words = tokens(line)
            if any(
                a in ("-j", "-g", "--jump", "--goto") and b == CHAIN for a, b in itertools.pairwise(words)
            ):
                found.jumps.append(line)
    return found


def check_tools() -> None:
    """Both tools are there and the rule set can be read (root): checked before install changes anything."""
    current()
    if shutil.which("iptables-restore") is None:
        raise RulesError(MISSING.format(tool="iptables-restore"))


def _same(rules: list[str], wanted: list[str]) -> bool:
    return [tokens(r) for r in rules] == [tokens(r) for r in wanted]


def install(config: Config, mode: str) -> list[str]:
    """Load (or replace) our chain with ``mode``'s rules and keep exactly one jump; idempotent."""
    wanted = chain_rules(config, mode)
    now = current()
    keep_jump = bool(now.jumps) and tokens(now.jumps[0]) == tokens(JUMP_RULE)
    if now.chain_exists and keep_jump and len(now.jumps) == 1 and _same(now.rules, wanted):
        return [f"iptables: {TABLE} chain {CHAIN} already installed ({len(wanted)} rules), unchanged"]
    extra = now.jumps[1:] if keep_jump else now.jumps
    lines = [f"*{TABLE}", *("-D" + jump[2:] for jump in extra), f":{CHAIN} - [0:0]", *wanted]
    if not keep_jump:
        lines.append(f"-I {HOOK} 1 -m comment --comment {JUMP_COMMENT} -j {CHAIN}")
    _restore("\n".join([*lines, "COMMIT", ""]))
    verb = "replaced" if now.chain_exists else "created"
    result = [f"iptables: {verb} {TABLE} chain {CHAIN} with {len(wanted)} rules ({mode} mode)"]
    if now.chain_exists:
        result[0] += f", was {len(now.rules)} rules"
    if not keep_jump:
        result.append(
            f"iptables: inserted the jump from {TABLE} {HOOK} to {CHAIN} (comment {JUMP_COMMENT!r})"
        )
    if extra and keep_jump:
        result.append(f"iptables: deleted {len(extra)} duplicate jump rule(s) to {CHAIN}")
    return result


def remove() -> list[str]:
    """Delete our jumps and chain; nothing else. Empty when there was nothing to delete."""
    now = current()
    if not now.chain_exists and not now.jumps:
        return []
    lines = [f"*{TABLE}", *("-D" + jump[2:] for jump in now.jumps)]
    if now.chain_exists:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    _restore("\n".join([*lines, "COMMIT", ""]))
    result = []
    if now.jumps:
        result.append(f"iptables: deleted {len(now.jumps)} jump rule(s) from {TABLE} {HOOK} to {CHAIN}")
    if now.chain_exists:
        result.append(f"iptables: deleted {TABLE} chain {CHAIN} ({len(now.rules)} rules)")
    return result


def problems(config: Config, mode: str) -> list[str]:
    """What differs from ``mode``'s rule set: the chain missing or different, not exactly one jump."""
    found = []
    now = current()
    if not now.chain_exists:
        found.append(f"iptables {TABLE} chain {CHAIN} does not exist")
    elif not _same(now.rules, chain_rules(config, mode)):
        found.append(f"iptables {TABLE} chain {CHAIN} does not hold the {mode} rules for {config.path}")
    if len(now.jumps) != 1:
        found.append(f"expected one jump from {TABLE} {HOOK} to {CHAIN}, found {len(now.jumps)}")
    return found


def installed() -> list[str]:
    """Our jump rules and chain rules as iptables-save shows them now."""
    now = current()
    return [*now.jumps, *now.rules]
