"""Loading the rule set into the kernel and reading it back: ``iptables-restore --noflush`` and ``iptables-save``.

Only our chains (``offload.HOOKS``: ``CONVEY-PREROUTING`` in raw, mangle and nat, ``CONVEY-POSTROUTING`` in nat,
``CONVEY-OUTPUT`` in raw)
and one jump rule to each are ever written, all tables in one ``iptables-restore`` input (each table's part is
committed atomically); an nft dump is never used (iptables-nft rules cannot be
loaded back from one). See ``iptables/README.md`` for the why. Every failure of the tools is a
:class:`~convey.dataplane.rules.ruleset.RulesError` that says which command failed and what it printed.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from convey.dataplane.rules.offload import HOOKS, ChainKey, jump_rule
from convey.dataplane.rules.ruleset import JUMP_COMMENT, RulesError

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


Wanted = Mapping[ChainKey, list[str]]
"""The rules of each chain a rule set uses, as iptables-save prints them; a chain not listed must not exist."""


@dataclass(slots=True)
class Current:
    """What iptables-save shows of one of our chains."""

    chain_exists: bool = False
    jumps: list[str] = field(default_factory=list)  # every rule of the hook jumping to the chain, as saved
    rules: list[str] = field(default_factory=list)  # the rules of the chain, as saved


def tokens(rule: str) -> list[str]:
    return shlex.split(rule)


def _jumps_to(words: list[str], chain: str) -> bool:
    return any(a in ("-j", "-g", "--jump", "--goto") and b == chain for a, b in itertools.pairwise(words))


def current() -> dict[ChainKey, Current]:
    """Each of our chains (and its jumps) as the kernel has them now (RulesError when iptables-save fails)."""
    found = {key: Current() for key in HOOKS}
    for wanted in dict.fromkeys(table for table, _ in HOOKS):  # one call per table (listing creates none)
        table = ""
        for line in _run(["iptables-save", "-t", wanted]).splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif table == wanted:
                _note(found, table, line)
    return found


def _note(found: dict[ChainKey, Current], table: str, line: str) -> None:
    """Record ``line`` of ``table``'s iptables-save output if it concerns one of our chains."""
    for key, hook in HOOKS.items():
        if key[0] != table:
            continue
        chain = key[1]
        if line.startswith(f":{chain} "):
            found[key].chain_exists = True
        elif line.startswith(f"-A {chain} "):
            found[key].rules.append(line)
        elif line.startswith(f"-A {hook} ") and _jumps_to(tokens(line), chain):
            found[key].jumps.append(line)


def check_tools() -> None:
    """Both tools are there and the rule set can be read (root): checked before install changes anything."""
    current()
    if shutil.which("iptables-restore") is None:
        raise RulesError(MISSING.format(tool="iptables-restore"))


def _same(rules: list[str], wanted: list[str]) -> bool:
    return [tokens(r) for r in rules] == [tokens(r) for r in wanted]


def _in_place(now: Current, key: ChainKey, wanted: list[str]) -> bool:
    return now.chain_exists and _same(now.jumps, [jump_rule(key)]) and _same(now.rules, wanted)


def _dropped(now: Current, key: ChainKey) -> tuple[list[str], list[str]]:
    """Restore lines deleting a chain we no longer want and its jumps, with what they do."""
    table, chain = key
    lines = ["-D" + jump[2:] for jump in now.jumps]
    said = []
    if now.jumps:
        said.append(f"iptables: deleted {len(now.jumps)} jump rule(s) from {table} {HOOKS[key]} to {chain}")
    if now.chain_exists:
        lines += [f"-F {chain}", f"-X {chain}"]
        said.append(f"iptables: deleted {table} chain {chain} ({len(now.rules)} rules)")
    return lines, said


def _replaced(now: Current, key: ChainKey, wanted: list[str], label: str) -> tuple[list[str], list[str]]:
    """Restore lines (re)filling a chain and keeping exactly one jump, with what they do."""
    table, chain = key
    keep_jump = bool(now.jumps) and tokens(now.jumps[0]) == tokens(jump_rule(key))
    extra = now.jumps[1:] if keep_jump else now.jumps
    lines = [*("-D" + jump[2:] for jump in extra), f":{chain} - [0:0]", *wanted]
    if not keep_jump:
        lines.append(f"-I {HOOKS[key]} 1 -m comment --comment {JUMP_COMMENT} -j {chain}")
    verb = "replaced" if now.chain_exists else "created"
    said = [f"iptables: {verb} {table} chain {chain} with {len(wanted)} rules ({label})"]
    if now.chain_exists:
        said[0] += f", was {len(now.rules)} rules"
    if not keep_jump:
        said.append(
            f"iptables: inserted the jump from {table} {HOOKS[key]} to {chain} (comment {JUMP_COMMENT!r})"
        )
    if extra and keep_jump:
        said.append(f"iptables: deleted {len(extra)} duplicate jump rule(s) to {chain}")
    return lines, said


def _apply(changes: dict[ChainKey, list[str]]) -> None:
    """Load every table's changes in one ``iptables-restore --noflush`` transaction."""
    lines: list[str] = []
    for table in dict.fromkeys(key[0] for key in HOOKS):
        # chains are declared (and deleted) after the jumps to them are gone, per table
        body = [line for key, part in changes.items() if key[0] == table for line in part]
        if body:
            lines += [f"*{table}", *body, "COMMIT"]
    if lines:
        _restore("\n".join([*lines, ""]))


def install(wanted: Wanted, label: str) -> list[str]:
    """Load (or replace) our chains with ``wanted`` (each with exactly one jump) and delete those of ours it does
    not list, in one iptables-restore input (atomic per table); idempotent. ``label`` names the rule set in the lines returned."""
    now = current()
    changes: dict[ChainKey, list[str]] = {}
    said: list[str] = []
    for key in HOOKS:
        if key in wanted:
            if _in_place(now[key], key, wanted[key]):
                table, chain = key
                said.append(
                    f"iptables: {table} chain {chain} already installed ({len(wanted[key])} rules), unchanged"
                )
                continue
            changes[key], lines = _replaced(now[key], key, wanted[key], label)
        elif now[key].chain_exists or now[key].jumps:
            changes[key], lines = _dropped(now[key], key)
        else:
            continue
        said += lines
    _apply(changes)
    return said


def remove() -> list[str]:
    """Delete our jumps and chains in every table; nothing else. Empty when there was nothing to delete."""
    return install({}, "")


def problems(wanted: Wanted, label: str) -> list[str]:
    """What differs from ``wanted``: a chain missing or different, not exactly one jump, a chain left over."""
    found = []
    now = current()
    for key in HOOKS:
        table, chain = key
        if key not in wanted:
            if now[key].chain_exists or now[key].jumps:
                found.append(f"iptables {table} chain {chain} is left from another rule set")
            continue
        if not now[key].chain_exists:
            found.append(f"iptables {table} chain {chain} does not exist")
        elif not _same(now[key].rules, wanted[key]):
            found.append(f"iptables {table} chain {chain} does not hold the {label}")
        if len(now[key].jumps) != 1:
            found.append(
                f"expected one jump from {table} {HOOKS[key]} to {chain}, found {len(now[key].jumps)}"
            )
    return found


def installed() -> list[str]:
    """Our jump rules and chain rules as iptables-save shows them now, table by table."""
    return [line for now in current().values() for line in (*now.jumps, *now.rules)]
