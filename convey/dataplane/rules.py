"""Kernel state for the packet modes: iptables rules, sysctls and (DSR ``rewrite = "mac"``) policy routing.

All iptables rules live in one chain of the ``raw`` table, :data:`CHAIN`, jumped to from ``PREROUTING`` by
exactly one rule carrying the comment ``convey``. For each frontend the chain holds ``-j CT --notrack`` (keep
conntrack out of the path) and then ``-j NFQUEUE --queue-num Q`` (hand the packet to convey; passthrough adds
``--queue-bypass`` to let it through when convey is not running, DSR drops it then); in passthrough mode the
same pair also catches the servers' replies to the ephemeral port range. Rules are loaded atomically with
``iptables-restore --noflush`` and read back with ``iptables-save``; an nft dump is never used (iptables-nft
rules cannot be loaded back from one). See ``iptables/README.md`` for the why.

Everything :func:`install` changes besides the iptables chain (sysctls, ip rules, routes) is recorded with its
old value in a small JSON state file, ``/run/convey/<netns name or "host">.json``, and :func:`remove` puts
back exactly what install changed (a sysctl someone has changed since is left alone and reported). ``/run`` is
a tmpfs, so the state file lives as long as the kernel state it describes.

DSR ``rewrite = "mac"`` routing: the verdict marks a packet for server *i* with ``fwmark_base + i``; an ``ip
rule fwmark M lookup T`` (pref :data:`MARK_RULE_PREF`) sends it through table ``route_table_base + i``, whose
only route is ``default via <server>``, so the frame goes to the server's MAC with the destination IP still
the VIP. The VIP is local, so these rules must come before the ``local`` rule, which sits at pref 0 by
default: install moves it to :data:`LOCAL_RULE_PREF`, right after our rules and still before every other rule,
so unmarked traffic is routed exactly as before. (Moving it to 32765 instead would put any existing policy
rule in front of local delivery.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convey.config import Config, ConfigError
from convey.dataplane import sysctl

log = logging.getLogger(__name__)

MODES = ("passthrough", "dsr")
TABLE = "raw"
CHAIN = "CONVEY-PREROUTING"
HOOK = "PREROUTING"
JUMP_COMMENT = "convey"
JUMP_RULE = f"-A {HOOK} -m comment --comment {JUMP_COMMENT} -j {CHAIN}"

STATE_DIR = Path("/run/convey")
STATE_VERSION = 1

MARK_RULE_PREF = 100  # our fwmark rules
LOCAL_RULE_PREF = 101  # where the `local` rule goes when it was at pref 0
RT_TABLE_LOCAL = 255
RESERVED_TABLES = (0, 253, 254, 255)  # unspec, default, main, local
RTPROT_STATIC = 4
RTN_LOCAL = 2
FR_ACT_TO_TBL = 1
AF_INET = 2

IP_FORWARD = "net.ipv4.ip_forward"
RESERVED_PORTS = "net.ipv4.ip_local_reserved_ports"

_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/=@+-]")


class RulesError(Exception):
    """A rule set that cannot be installed or removed (a tool failed, the kernel refused, a conflict)."""


# -- rendering (pure) ----------------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _queue_num(config: Config, mode: str) -> int:
    return config.passthrough.queue_num if mode == "passthrough" else config.dsr.queue_num


def _comment(text: str) -> str:
    """A comment match in the form iptables-save prints it back (quoted unless plain alphanumeric)."""
    text = _COMMENT_UNSAFE.sub("_", text)[:255]
    quoted = text if text.isalnum() else f'"{text}"'
    return f"-m comment --comment {quoted}"


def chain_rules(config: Config, mode: str) -> list[str]:
    """The rules of :data:`CHAIN`, each as iptables-save prints it (``-A CONVEY-PREROUTING ...``).

    Raises ConfigError for a frontend listening on 0.0.0.0: a packet mode needs the VIP as a specific address.
    """
    _check_mode(mode)
    # DSR queues without --queue-bypass: while no convey is bound (a restart), packets of established flows
    # must be dropped (TCP retransmits them) rather than accepted, since the balancer's own stack would answer
    # them with a RST (the VIP is local) and end connections a restarted convey would otherwise keep.
    bypass = " --queue-bypass" if mode == "passthrough" else ""
    queue = f"-j NFQUEUE --queue-num {_queue_num(config, mode)}{bypass}"
    rules: list[str] = []

    def pair(match: str, comment: str) -> None:
        rules.append(f"-A {CHAIN} {match} {_comment(comment)} -j CT --notrack")
        rules.append(f"-A {CHAIN} {match} {_comment(comment)} {queue}")

    for front in config.frontends.values():
        if ipaddress.IPv4Address(front.listen_addr.host).is_unspecified:
            raise ConfigError(
                config.path,
                f"frontends.{front.name}.listen_addr",
                f"{front.listen_addr} means every address; {mode} mode needs the VIP as a specific address",
            )
        vip = front.listen_addr
        pair(f"-d {vip.host}/32 -p tcp -m tcp --dport {vip.port}", f"convey frontend {front.name}")

    if mode == "passthrough":
        lo, hi = config.passthrough.port_range
        sources = config.passthrough.source_addrs or (None,)
        seen = set()
        for back_name in _used_backends(config):
            for server in config.backends[back_name].servers:
                if server.addr in seen:
                    continue
                seen.add(server.addr)
                for source in sources:
                    # Only replies to a balancer address: with source_addrs unset, any local address (a
                    # server answering a client the balancer merely routes is none of ours).
                    dest = f" -d {source}/32" if source else ""
                    local = "" if source else " -m addrtype --dst-type LOCAL"
                    ports = f"--sport {server.addr.port} --dport {lo}:{hi}"
                    match = f"-s {server.addr.host}/32{dest} -p tcp -m tcp {ports}{local}"
                    pair(match, f"convey server {back_name}/{server.name}")
    return rules


def render(config: Config, mode: str) -> str:
    """The rule set as ``iptables-restore --noflush`` input that touches only our chain and our jump rule.

    Loading it declares (and so empties) :data:`CHAIN`, fills it, and inserts the jump at the top of
    PREROUTING; to load it again, remove the jump first (or use :func:`install`, which keeps exactly one).
    """
    rules = chain_rules(config, mode)
    lines = [
        f"*{TABLE}",
        f":{CHAIN} - [0:0]",
        *rules,
        JUMP_RULE.replace("-A ", "-I ", 1).replace(HOOK, f"{HOOK} 1", 1),
    ]
    return "\n".join([*lines, "COMMIT", ""])


def show(config: Config, mode: str) -> str:
    """The rule set with comments saying what else :func:`install` does; valid ``iptables-restore`` input."""
    lines = [
        f"# convey {mode} mode: iptables rules rendered from {config.path}",
        "# Load with `convey rules install` (idempotent), or: iptables-restore --noflush < this-file",
        "# (a second plain load adds a second jump rule; remove it with `convey rules remove`).",
        "#",
        "# install also sets these sysctls (remove restores them):",
    ]
    for key, value in _generic_sysctls(config, mode):
        lines.append(f"#   {key} = {value}")
    if mode == "dsr" and config.dsr.rewrite == "mac":
        lines.append("#")
        lines.append("# and policy routing for dsr.rewrite = mac (the verdict marks packets per server):")
        lines.append(
            f"#   ip rule add pref {LOCAL_RULE_PREF} lookup local && ip rule del pref 0 lookup local"
        )
        for route in _mark_plan(config):
            lines.append(f"#   ip rule add pref {MARK_RULE_PREF} fwmark {route.mark:#x} lookup {route.table}")
            lines.append(f"#   ip route add default via {route.gateway} table {route.table}")
    lines.append("")
    return "\n".join(lines) + render(config, mode)


def _generic_sysctls(config: Config, mode: str) -> list[tuple[str, str]]:
    items = [(IP_FORWARD, "1")]
    if mode == "passthrough":
        lo, hi = config.passthrough.port_range
        items.append(("net.ipv4.conf.all.accept_local", "1"))
        items.append(("net.ipv4.conf.<interfaces to servers and holding the VIPs>.accept_local", "1"))
        items.append(("net.ipv4.conf.{all,<those interfaces>}.rp_filter", "2 where it is 1 (strict)"))
        items.append((RESERVED_PORTS, f"(existing list)+{lo}-{hi}"))
    else:
        items.append(("net.ipv4.conf.all.send_redirects", "0"))
        items.append(("net.ipv4.conf.<interfaces to servers and holding the VIPs>.send_redirects", "0"))
    return items


def _used_backends(config: Config) -> list[str]:
    names: list[str] = []
    for front in config.frontends.values():
        if front.backend not in names:
            names.append(front.backend)
    return names


# -- DSR marks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _MarkRoute:
    mark: int
    table: int
    gateway: str  # the server address
    servers: tuple[tuple[str, str], ...]  # (backend, server name) sharing that address


def _mark_plan(config: Config) -> list[_MarkRoute]:
    """One mark and table per distinct server address, in config order (all backends)."""
    by_host: dict[str, list[tuple[str, str]]] = {}
    for back in config.backends.values():
        for server in back.servers:
            by_host.setdefault(server.addr.host, []).append((back.name, server.name))
    plan: list[_MarkRoute] = []
    for index, (host, servers) in enumerate(by_host.items()):
        table = config.dsr.route_table_base + index
        if table in RESERVED_TABLES or table > 0xFFFFFFFF:
            raise ConfigError(
                config.path,
                "dsr.route_table_base",
                f"server {servers[0][0]}/{servers[0][1]} would use route table {table}, which is reserved "
                "(253 default, 254 main, 255 local); choose a base so that base..base+servers-1 avoids them",
            )
        mark = config.dsr.fwmark_base + index
        if mark > 0xFFFFFFFF:
            raise ConfigError(config.path, "dsr.fwmark_base", f"fwmark {mark:#x} does not fit in 32 bits")
        plan.append(_MarkRoute(mark, table, host, tuple(servers)))
    return plan


def server_marks(config: Config) -> dict[tuple[str, str], int]:
    """The fwmark the DSR data plane sets for each (backend, server name).

    One mark per distinct server address, ``dsr.fwmark_base + index`` in config order over all backends;
    servers sharing an address share its mark (and its route table, ``dsr.route_table_base + index``).
    """
    return {key: route.mark for route in _mark_plan(config) for key in route.servers}


# -- iptables (system) ---------------------------------------------------------------------------------------


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise RulesError(f"{argv[0]} not found: install iptables (the nft variant, iptables-nft)") from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{argv[0]} did not finish within 60 seconds") from None
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise RulesError(f"{' '.join(argv)} failed: {detail}")
    return proc.stdout


def _restore(text: str) -> None:
    log.debug("iptables-restore --noflush input:\n%s", text)
    _run(["iptables-restore", "--noflush"], stdin=text)


@dataclass(slots=True)
class _Current:
    """What iptables-save shows of ours in the raw table."""

    chain_exists: bool = False
    jumps: list[str] = field(default_factory=list)  # every PREROUTING rule jumping to CHAIN, as saved
    rules: list[str] = field(default_factory=list)  # the rules of CHAIN, as saved


def _tokens(rule: str) -> list[str]:
    return shlex.split(rule)


def _current() -> _Current:
    current = _Current()
    for line in _run(["iptables-save", "-t", TABLE]).splitlines():
        if line.startswith(f":{CHAIN} "):
            current.chain_exists = True
        elif line.startswith(f"-A {CHAIN} "):
            current.rules.append(line)
        elif line.startswith(f"-A {HOOK} "):
            tokens = _tokens(line)
            if any(
                a in ("-j", "-g", "--jump", "--goto") and b == CHAIN for a, b in itertools.pairwise(tokens)
            ):
                current.jumps.append(line)
    return current


def _rules_match(current: _Current, wanted: list[str]) -> bool:
    return (
        current.chain_exists
        and len(current.jumps) == 1
        and _tokens(current.jumps[0]) == _tokens(JUMP_RULE)
        and [_tokens(r) for r in current.rules] == [_tokens(r) for r in wanted]
    )


def _install_iptables(config: Config, mode: str) -> list[str]:
    wanted = chain_rules(config, mode)
    current = _current()
    if _rules_match(current, wanted):
        return [f"iptables: {TABLE} chain {CHAIN} already installed ({len(wanted)} rules), unchanged"]
    lines = [f"*{TABLE}"]
    keep_jump = len(current.jumps) > 0 and _tokens(current.jumps[0]) == _tokens(JUMP_RULE)
    extra = current.jumps[1:] if keep_jump else current.jumps
    lines += ["-D" + jump[2:] for jump in extra]
    lines += [f":{CHAIN} - [0:0]", *wanted]
    if not keep_jump:
        lines.append(f"-I {HOOK} 1 -m comment --comment {JUMP_COMMENT} -j {CHAIN}")
    lines += ["COMMIT", ""]
    _restore("\n".join(lines))
    verb = "replaced" if current.chain_exists else "created"
    result = [f"iptables: {verb} {TABLE} chain {CHAIN} with {len(wanted)} rules ({mode} mode)"]
    if current.chain_exists:
        result[0] += f", was {len(current.rules)} rules"
    if not keep_jump:
        result.append(
            f"iptables: inserted the jump from {TABLE} {HOOK} to {CHAIN} (comment {JUMP_COMMENT!r})"
        )
    if extra and keep_jump:
        result.append(f"iptables: deleted {len(extra)} duplicate jump rule(s) to {CHAIN}")
    return result


def _remove_iptables() -> list[str]:
    current = _current()
    if not current.chain_exists and not current.jumps:
        return []
    lines = [f"*{TABLE}", *("-D" + jump[2:] for jump in current.jumps)]
    if current.chain_exists:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    lines += ["COMMIT", ""]
    _restore("\n".join(lines))
    result = []
    if current.jumps:
        result.append(f"iptables: deleted {len(current.jumps)} jump rule(s) from {TABLE} {HOOK} to {CHAIN}")
    if current.chain_exists:
        result.append(f"iptables: deleted {TABLE} chain {CHAIN} ({len(current.rules)} rules)")
    return result


# -- state file ----------------------------------------------------------------------------------------------


def namespace_name() -> str:
    """The name of the current network namespace: its ``ip netns`` name, ``host`` for the initial one."""
    mine = os.stat("/proc/self/ns/net")
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/run/netns")):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join("/run/netns", name))
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return name
    # kthreadd (pid 2) always lives in the initial namespace; pid 1 may be unreadable (containers, sandboxes)
    for pid in (2, 1):
        with contextlib.suppress(OSError):
            init = os.stat(f"/proc/{pid}/ns/net")
            same = (init.st_dev, init.st_ino) == (mine.st_dev, mine.st_ino)
            return "host" if same else f"netns-{mine.st_ino}"
    return f"netns-{mine.st_ino}"


def state_path(state_dir: Path | None = None) -> Path:
    return (state_dir or STATE_DIR) / f"{namespace_name()}.json"


def _load_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"version": STATE_VERSION, "sysctls": {}, "routing": {}}
    except (OSError, ValueError) as exc:
        raise RulesError(f"cannot read convey state {path}: {exc}; remove it after checking") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise RulesError(f"convey state {path} has an unknown format; remove it after checking")
    data.setdefault("sysctls", {})
    data.setdefault("routing", {})
    return data


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- routing facts (pyroute2) --------------------------------------------------------------------------------


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


@dataclass(frozen=True, slots=True)
class _Route:
    kind: int  # RTN_*
    oif: str | None
    gateway: str | None


def _route_to(ipr: Any, addr: str) -> _Route | None:
    try:
        msgs = ipr.route("get", dst=addr)
    except Exception:  # pyroute2 raises NetlinkError for "no route"
        return None
    for msg in msgs:
        index = msg.get_attr("RTA_OIF")
        return _Route(int(msg["type"]), _ifname(ipr, index) if index else None, msg.get_attr("RTA_GATEWAY"))
    return None


def _ifname(ipr: Any, index: int) -> str | None:
    for link in ipr.get_links(index):
        name = link.get_attr("IFLA_IFNAME")
        return str(name) if name is not None else None
    return None


def _iface_of_address(ipr: Any, addr: str) -> str | None:
    for msg in ipr.get_addr(family=AF_INET):
        if addr in (msg.get_attr("IFA_LOCAL"), msg.get_attr("IFA_ADDRESS")):
            return _ifname(ipr, msg["index"])
    return None


def _involved_ifaces(ipr: Any, config: Config, mode: str) -> tuple[list[str], list[str]]:
    """Interfaces towards the servers and holding the VIPs (lo excluded), and warnings."""
    names: list[str] = []
    warnings: list[str] = []
    for front in config.frontends.values():
        name = _iface_of_address(ipr, front.listen_addr.host)
        if name is None:
            warnings.append(
                f"warning: VIP {front.listen_addr.host} (frontends.{front.name}) is not an address here"
            )
        elif name != "lo" and name not in names:
            names.append(name)
    for back_name in _used_backends(config):
        for server in config.backends[back_name].servers:
            route = _route_to(ipr, server.addr.host)
            if route is None or route.oif is None:
                warnings.append(f"warning: no route to server {back_name}/{server.name} ({server.addr.host})")
            elif route.oif != "lo" and route.oif not in names:
                names.append(route.oif)
    return names, warnings


# -- sysctls -------------------------------------------------------------------------------------------------


def _port_ranges(value: str) -> list[tuple[int, int]]:
    ranges = []
    for token in value.replace(" ", "").split(","):
        if not token:
            continue
        lo, _, hi = token.partition("-")
        ranges.append((int(lo), int(hi or lo)))
    return ranges


def _covers(value: str, lo: int, hi: int) -> bool:
    want = lo
    for a, b in sorted(_port_ranges(value)):
        if a > want:
            break
        want = max(want, b + 1)
        if want > hi:
            return True
    return want > hi


def _with_reserved(value: str, lo: int, hi: int) -> str:
    if _covers(value, lo, hi):
        return value
    return ",".join(t for t in (value.replace(" ", ""), f"{lo}-{hi}") if t)


def _wanted_sysctls(
    config: Config, mode: str, ifaces: list[str], originals: dict[str, str]
) -> dict[str, str]:
    wanted = {IP_FORWARD: "1"}
    if mode == "passthrough":
        wanted["net.ipv4.conf.all.accept_local"] = "1"
        for name in ifaces:
            wanted[sysctl.conf_key(name, "accept_local")] = "1"
        # Strict reverse-path filtering (1) drops the rewritten packets even with accept_local (measured);
        # the kernel uses max(all, interface), so loose (2) where it is strict is enough. 0 and 2 stay.
        for name in ["all", *ifaces]:
            key = sysctl.conf_key(name, "rp_filter")
            if originals.get(key, sysctl.read(key)) == "1":
                wanted[key] = "2"
        lo, hi = config.passthrough.port_range
        base = originals.get(RESERVED_PORTS, sysctl.read(RESERVED_PORTS))
        wanted[RESERVED_PORTS] = _with_reserved(base, lo, hi)
    else:
        wanted["net.ipv4.conf.all.send_redirects"] = "0"
        for name in ifaces:
            wanted[sysctl.conf_key(name, "send_redirects")] = "0"
    return wanted


def _install_sysctls(wanted: dict[str, str], state: dict[str, Any]) -> list[str]:
    recorded: dict[str, dict[str, str]] = state["sysctls"]
    lines = _restore_sysctls({k: v for k, v in recorded.items() if k not in wanted}, recorded)
    for key, value in wanted.items():
        change = sysctl.write(key, value)
        if change is None:
            continue
        lines.append(str(change))
        if key in recorded:
            recorded[key]["new"] = change.new
        else:
            recorded[key] = {"old": change.old, "new": change.new}
    return lines


def _restore_sysctls(items: dict[str, dict[str, str]], recorded: dict[str, dict[str, str]]) -> list[str]:
    lines = []
    for key, values in reversed(list(items.items())):
        recorded.pop(key, None)
        if not sysctl.exists(key):
            continue
        now = sysctl.read(key)
        if now != values["new"]:
            lines.append(f"sysctl {key}: left at {now} (convey had set {values['new']}; changed since)")
            continue
        change = sysctl.write(key, values["old"])
        if change is not None:
            lines.append(str(change))
    return lines


# -- policy routing (DSR rewrite = "mac") --------------------------------------------------------------------


def _rules(ipr: Any) -> list[dict[str, Any]]:
    """IPv4 ip rules as plain dicts: pref, table, fwmark, protocol, plain (no selector besides the table)."""
    result = []
    for msg in ipr.get_rules(family=AF_INET):
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        selectors = ("FRA_SRC", "FRA_DST", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_FWMARK", "FRA_SPORT_RANGE")
        plain = (
            msg["src_len"] == 0
            and msg["dst_len"] == 0
            and msg["tos"] == 0
            and msg["action"] == FR_ACT_TO_TBL
            and all(msg.get_attr(name) is None for name in selectors)
        )
        result.append(
            {
                "pref": msg.get_attr("FRA_PRIORITY") or 0,
                "table": table,
                "fwmark": msg.get_attr("FRA_FWMARK"),
                "protocol": msg.get_attr("FRA_PROTOCOL") or 0,
                "plain": plain,
            }
        )
    return result


def _local_rule(rules: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r for r in rules if r["plain"] and r["table"] == RT_TABLE_LOCAL]
    return min(found, key=lambda r: r["pref"]) if found else None


def _table_routes(ipr: Any, table: int) -> list[Any]:
    return [
        msg
        for msg in ipr.get_routes(family=AF_INET, table=table)
        if (msg.get_attr("RTA_TABLE") or msg["table"]) == table
    ]


def _plan_routes(ipr: Any, config: Config) -> list[dict[str, Any]]:
    """The mark plan with the interface of each server, checking each is on a directly connected network."""
    planned = []
    for route in _mark_plan(config):
        back, name = route.servers[0]
        key = f"backends.{back}.servers.{name}.addr"
        found = _route_to(ipr, route.gateway)
        if found is None or found.oif is None:
            raise ConfigError(
                config.path, key, f'no route to {route.gateway}; dsr.rewrite = "mac" needs it on-link'
            )
        if found.kind == RTN_LOCAL:
            raise ConfigError(config.path, key, f"{route.gateway} is an address of this host")
        if found.gateway is not None:
            raise ConfigError(
                config.path,
                key,
                f'{route.gateway} is reached via the gateway {found.gateway}; dsr.rewrite = "mac" needs the '
                "balancer and every server on one L2 segment (a directly connected network)",
            )
        planned.append({"mark": route.mark, "table": route.table, "gateway": route.gateway, "oif": found.oif})
    return planned


def _check_routing(ipr: Any, config: Config, routing: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything that could stop the DSR mac routing, checked before anything changes; returns the plan."""
    planned = _plan_routes(ipr, config)
    previous = routing.get("marks", [])
    rules = _rules(ipr)
    for item in planned:
        for rule in rules:
            if rule["fwmark"] == item["mark"] and rule["table"] != item["table"]:
                raise RulesError(
                    f"an ip rule (pref {rule['pref']}) already uses fwmark {item['mark']:#x}; "
                    "choose another dsr.fwmark_base"
                )
        if _table_routes(ipr, item["table"]) and item["table"] not in {m["table"] for m in previous}:
            raise RulesError(f"route table {item['table']} is not empty; choose another dsr.route_table_base")
    ours = {(m["mark"], m["table"]) for m in [*previous, *planned]}
    _local_rule_to_move(rules, ours)
    return planned


def _local_rule_to_move(rules: list[dict[str, Any]], ours: set[tuple[int, int]]) -> dict[str, Any] | None:
    """The `lookup local` rule when it must move from pref 0 to after our fwmark rules; None when it need not.

    Refuses when moving it would change how unmarked traffic is routed (another rule would come first)."""
    local = _local_rule(rules)
    if local is None:
        raise RulesError("no `lookup local` ip rule found; refusing to guess where local delivery happens")
    if local["pref"] > MARK_RULE_PREF:
        return None  # already after our rules (moved by us earlier, or by the administrator)
    if local["pref"] != 0:
        raise RulesError(
            f"the `lookup local` ip rule is at pref {local['pref']}, before convey's fwmark rules (pref "
            f"{MARK_RULE_PREF}); move it after pref {MARK_RULE_PREF} or to pref 0"
        )
    blockers = [
        r
        for r in rules
        if 0 < r["pref"] <= LOCAL_RULE_PREF and (r["fwmark"], r["table"]) not in ours and r is not local
    ]
    if blockers:
        prefs = ", ".join(str(r["pref"]) for r in blockers)
        raise RulesError(
            f"ip rules at pref {prefs} would come before local delivery once convey moves `lookup local` "
            f"from pref 0 to {LOCAL_RULE_PREF}; move them after pref {LOCAL_RULE_PREF}"
        )
    return local


def _install_routing(ipr: Any, planned: list[dict[str, Any]], routing: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    # drop what a previous install set up and this one does not want
    wanted = [(i["mark"], i["table"], i["gateway"], i["oif"]) for i in planned]
    for old in routing.get("marks", []):
        if (old["mark"], old["table"], old["gateway"], old["oif"]) not in wanted:
            lines += _delete_mark(ipr, old)
    routing["marks"] = planned
    # our routes and rules, added where missing
    rules = _rules(ipr)
    for item in planned:
        index = ipr.link_lookup(ifname=item["oif"])[0]
        routes = _table_routes(ipr, item["table"])
        if not any(
            r["dst_len"] == 0
            and r.get_attr("RTA_GATEWAY") == item["gateway"]
            and r.get_attr("RTA_OIF") == index
            for r in routes
        ):
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                gateway=item["gateway"],
                oif=index,
                table=item["table"],
                proto=RTPROT_STATIC,
            )
            lines.append(
                f"ip route replace default via {item['gateway']} dev {item['oif']} table {item['table']}"
            )
        if not any(
            r["fwmark"] == item["mark"] and r["table"] == item["table"] and r["pref"] == MARK_RULE_PREF
            for r in rules
        ):
            ipr.rule(
                "add", family=AF_INET, priority=MARK_RULE_PREF, fwmark=item["mark"], table=item["table"],
                protocol=RTPROT_STATIC,
            )  # fmt: skip
            lines.append(f"ip rule add pref {MARK_RULE_PREF} fwmark {item['mark']:#x} lookup {item['table']}")
    # then local delivery moves after our rules: add the new one before deleting the old (always one there)
    local = _local_rule_to_move(_rules(ipr), {(m["mark"], m["table"]) for m in planned})
    if local is not None:
        protocol = local["protocol"]
        ipr.rule("add", family=AF_INET, priority=LOCAL_RULE_PREF, table=RT_TABLE_LOCAL, protocol=protocol)
        ipr.rule("del", family=AF_INET, priority=0, table=RT_TABLE_LOCAL)
        routing["local_moved"] = {"from": 0, "to": LOCAL_RULE_PREF, "protocol": protocol}
        lines.append(f"ip rule: moved `from all lookup local` from pref 0 to pref {LOCAL_RULE_PREF}")
    return lines


def _delete_mark(ipr: Any, item: dict[str, Any]) -> list[str]:
    lines = []
    for rule in _rules(ipr):
        if (
            rule["fwmark"] == item["mark"]
            and rule["table"] == item["table"]
            and rule["pref"] == MARK_RULE_PREF
        ):
            ipr.rule("del", family=AF_INET, priority=MARK_RULE_PREF, fwmark=item["mark"], table=item["table"])
            lines.append(f"ip rule del pref {MARK_RULE_PREF} fwmark {item['mark']:#x} lookup {item['table']}")
    for route in _table_routes(ipr, item["table"]):
        if route["dst_len"] == 0 and route.get_attr("RTA_GATEWAY") == item["gateway"]:
            ipr.route("del", dst="0.0.0.0/0", gateway=item["gateway"], table=item["table"])
            lines.append(f"ip route del default via {item['gateway']} table {item['table']}")
    return lines


def _remove_routing(ipr: Any, routing: dict[str, Any]) -> list[str]:
    lines = []
    moved = routing.pop("local_moved", None)
    if moved:
        rules = _rules(ipr)
        at = {r["pref"] for r in rules if r["plain"] and r["table"] == RT_TABLE_LOCAL}
        if moved["from"] not in at:
            ipr.rule(
                "add",
                family=AF_INET,
                priority=moved["from"],
                table=RT_TABLE_LOCAL,
                protocol=moved["protocol"],
            )
        if moved["to"] in at:
            ipr.rule("del", family=AF_INET, priority=moved["to"], table=RT_TABLE_LOCAL)
        lines.append(
            f"ip rule: moved `from all lookup local` back from pref {moved['to']} to pref {moved['from']}"
        )
    for item in routing.pop("marks", []):
        lines += _delete_mark(ipr, item)
    return lines


def _guess_routing(ipr: Any, config: Config) -> dict[str, Any]:
    """Without a state file: what a DSR mac install of this config would have left (remove's fallback)."""
    marks = [{"mark": r.mark, "table": r.table, "gateway": r.gateway, "oif": ""} for r in _mark_plan(config)]
    routing: dict[str, Any] = {"marks": marks}
    rules = _rules(ipr)
    local = _local_rule(rules)
    if local is not None and local["pref"] == LOCAL_RULE_PREF:
        routing["local_moved"] = {"from": 0, "to": LOCAL_RULE_PREF, "protocol": local["protocol"]}
    return routing


# -- the API -------------------------------------------------------------------------------------------------


def install(config: Config, mode: str, *, state_dir: Path | None = None) -> list[str]:
    """Install (or replace) the convey rule set for ``mode``; idempotent. Returns what changed, one line each.

    Order: sysctls, then policy routing, then iptables last, so traffic is diverted only once the rest is
    ready. Problems found first (a 0.0.0.0 VIP, a DSR mac server not on-link, ip rules or tables in the way)
    raise ConfigError or RulesError and change nothing.
    """
    _check_mode(mode)
    chain_rules(config, mode)  # validates the VIPs before anything changes
    path = state_path(state_dir)
    state = _load_state(path)
    lines: list[str] = []
    mac = mode == "dsr" and config.dsr.rewrite == "mac"
    with _iproute() as ipr:
        planned = _check_routing(ipr, config, state["routing"]) if mac else []
        ifaces, warnings = _involved_ifaces(ipr, config, mode)
        lines += warnings
        originals = {key: values["old"] for key, values in state["sysctls"].items()}
        try:
            lines += _install_sysctls(_wanted_sysctls(config, mode, ifaces, originals), state)
            if mac:
                lines += _install_routing(ipr, planned, state["routing"])
            else:
                lines += _remove_routing(ipr, state["routing"])
        finally:
            state["mode"] = mode
            state["config"] = config.path
            _save_state(path, state)
    lines += _install_iptables(config, mode)
    for line in lines:
        log.info("rules install: %s", line)
    return lines


def remove(config: Config | None = None, *, state_dir: Path | None = None) -> list[str]:
    """Remove our jump rule and chain and undo what install changed, nothing else; fine when nothing is there.

    The recorded state says what to undo. Without it (a lost state file), a given ``config`` lets remove find
    the DSR policy routing install would have added; sysctls are then left as they are.
    """
    lines = _remove_iptables()
    path = state_path(state_dir)
    state = _load_state(path)
    if not path.exists() and config is not None and config.dsr.rewrite == "mac":
        with _iproute() as ipr:
            state["routing"] = _guess_routing(ipr, config)
    with _iproute() as ipr:
        lines += _remove_routing(ipr, state["routing"])
    lines += _restore_sysctls(dict(state["sysctls"]), state["sysctls"])
    path.unlink(missing_ok=True)
    for line in lines:
        log.info("rules remove: %s", line)
    return lines


def problems(config: Config, mode: str) -> list[str]:
    """What is missing for ``mode`` with this config; empty when the rule set is fully in place."""
    _check_mode(mode)
    found: list[str] = []
    current = _current()
    if not current.chain_exists:
        found.append(f"iptables {TABLE} chain {CHAIN} does not exist")
    elif [_tokens(r) for r in current.rules] != [_tokens(r) for r in chain_rules(config, mode)]:
        found.append(f"iptables {TABLE} chain {CHAIN} does not hold the {mode} rules for {config.path}")
    if len(current.jumps) != 1:
        found.append(f"expected one jump from {TABLE} {HOOK} to {CHAIN}, found {len(current.jumps)}")
    if sysctl.read(IP_FORWARD) != "1":
        found.append(f"sysctl {IP_FORWARD} is not 1")
    if mode == "passthrough":
        if sysctl.read("net.ipv4.conf.all.accept_local") != "1":
            found.append("sysctl net.ipv4.conf.all.accept_local is not 1")
        if sysctl.read("net.ipv4.conf.all.rp_filter") == "1":
            found.append(
                "sysctl net.ipv4.conf.all.rp_filter is 1 (strict): rewritten packets would be dropped"
            )
        lo, hi = config.passthrough.port_range
        if not _covers(sysctl.read(RESERVED_PORTS), lo, hi):
            found.append(f"sysctl {RESERVED_PORTS} does not reserve {lo}-{hi}")
    if mode == "dsr" and config.dsr.rewrite == "mac":
        with _iproute() as ipr:
            rules = _rules(ipr)
            local = _local_rule(rules)
            for route in _mark_plan(config):
                mark_rules = [r for r in rules if r["fwmark"] == route.mark and r["table"] == route.table]
                if not mark_rules:
                    found.append(f"no ip rule fwmark {route.mark:#x} lookup {route.table}")
                elif local is not None and min(r["pref"] for r in mark_rules) >= local["pref"]:
                    found.append(f"ip rule fwmark {route.mark:#x} comes after the `lookup local` rule")
                gateways = [
                    r.get_attr("RTA_GATEWAY") for r in _table_routes(ipr, route.table) if r["dst_len"] == 0
                ]
                if route.gateway not in gateways:
                    found.append(f"no route default via {route.gateway} in table {route.table}")
    return found


def present(config: Config, mode: str) -> bool:
    """True when our chain holds the expected rules (and sysctls and policy routing are in place)."""
    return not problems(config, mode)


def installed_rules() -> Iterator[str]:
    """Our jump rules and chain rules as iptables-save shows them now."""
    current = _current()
    yield from current.jumps
    yield from current.rules
