"""The rule set of a packet mode, rendered from a config: pure, no I/O (unit-tested in tests/unit).

All iptables rules live in one chain of the ``raw`` table, :data:`CHAIN`, jumped to from ``PREROUTING`` by
exactly one rule carrying the comment ``convey``. For each frontend the chain holds ``-j CT --notrack`` (keep
conntrack out of the path) and then ``-j NFQUEUE --queue-num Q`` (hand the packet to convey; passthrough adds
``--queue-bypass`` to let it through when convey is not running, DSR drops it then); in passthrough mode the
same pair also catches the servers' replies to the ephemeral port range, and ICMP errors (types 3, 11, 12)
addressed to the VIPs or the balancer's source addresses from outside; ICMP errors the balancer's own kernel
sends to those addresses (forwarding a packet too big for the next link) never pass PREROUTING on the way to
``lo`` with a new route, so a second chain, :data:`OUTPUT_CHAIN` in ``raw OUTPUT``, queues them (the queue
routes a ``LOCAL_OUT`` packet again when its verdict changed the addresses). Both are rendered by
:func:`chains` (convey.packet.icmp translates them). The ICMP rules queue without ``CT --notrack``: an error
about one of convey's untracked flows finds no conntrack entry either way, and one about the balancer's own
connections (health checks, an SSH session) stays RELATED for a stateful firewall, as without convey.

DSR ``rewrite = "mac"`` marks: one fwmark and one route table per distinct server address
(:func:`mark_plan`), which :mod:`convey.dataplane.rules.routing` turns into ip rules and routes and the data
plane sets per packet (:func:`server_marks`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from convey.config import Config, ConfigError, offloaded, workers_for
from convey.errors import ConveyError
from convey.modes import PACKET_MODES, Mode, Rewrite
from convey.workers.slices import client_steer_match, icmp_steer_matches, return_port_ranges

MODES = PACKET_MODES
TABLE = "raw"
CHAIN = "CONVEY-PREROUTING"
HOOK = "PREROUTING"
JUMP_COMMENT = "convey"
JUMP_RULE = f"-A {HOOK} -m comment --comment {JUMP_COMMENT} -j {CHAIN}"
OUTPUT_CHAIN = "CONVEY-OUTPUT"  # passthrough: ICMP errors from the balancer's own kernel
OUTPUT_HOOK = "OUTPUT"
# ICMP errors: destination unreachable (fragmentation needed too), time exceeded, parameter problem
ICMP_ERRORS = (3, 11, 12)

MARK_RULE_PREF = 100  # our fwmark rules
LOCAL_RULE_PREF = 101  # where the `local` rule goes when it was at pref 0
RESERVED_TABLES = (0, 253, 254, 255)  # unspec, default, main, local
FULL_MARK = 0xFFFFFFFF  # an ip rule's fwmark mask when none is given: the whole mark
SERVER_MARK_BITS = 0x00FFFFFF  # DSR mac offload with workers: the server's mark, below the worker's number

IP_FORWARD = "net.ipv4.ip_forward"
RESERVED_PORTS = "net.ipv4.ip_local_reserved_ports"

_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/=@+-]")


class RulesError(ConveyError):
    """A rule set that cannot be installed or removed (a tool failed, the kernel refused, a conflict)."""


def packet_mode(mode: str) -> Mode:
    """``mode`` as a packet :class:`Mode`; ValueError for anything else (``proxy`` has no rules)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return Mode(mode)


def uses_marks(config: Config, mode: str) -> bool:
    """Whether ``mode`` needs the fwmark policy routing (DSR with ``rewrite = "mac"``)."""
    return mode == Mode.DSR and config.dsr.rewrite == Rewrite.MAC


def _queue_num(config: Config, mode: Mode) -> int:
    return config.passthrough.queue_num if mode == Mode.PASSTHROUGH else config.dsr.queue_num


def _comment(text: str) -> str:
    """A comment match in the form iptables-save prints it back (quoted unless plain alphanumeric)."""
    text = _COMMENT_UNSAFE.sub("_", text)[:255]
    quoted = text if text.isalnum() else f'"{text}"'
    return f"-m comment --comment {quoted}"


def used_backends(config: Config) -> list[str]:
    """The backends some frontend uses, in config order."""
    names: list[str] = []
    for front in config.frontends.values():
        if front.backend not in names:
            names.append(front.backend)
    return names


def chain_rules(config: Config, mode: str) -> list[str]:
    """The rules of :data:`CHAIN`, each as iptables-save prints it (``-A CONVEY-PREROUTING ...``).

    Raises ConfigError for a frontend listening on 0.0.0.0: a packet mode needs the VIP as a specific address.
    """
    mode = packet_mode(mode)
    # DSR queues without --queue-bypass: while no convey is bound (a restart), packets of established flows
    # must be dropped (TCP retransmits them) rather than accepted, since the balancer's own stack would answer
    # them with a RST (the VIP is local) and end connections a restarted convey would otherwise keep.
    bypass = " --queue-bypass" if mode == Mode.PASSTHROUGH else ""
    count = workers_for(config, mode)
    base = _queue_num(config, mode)
    rules: list[str] = []

    def queued(match: str, comment: str, steer: str, index: int) -> str:
        """The rule handing ``match`` (narrowed by ``steer``) to worker ``index``'s queue."""
        match = f"{match} {steer}" if steer else match
        return f"-A {CHAIN} {match} {_comment(comment)} -j NFQUEUE --queue-num {base + index}{bypass}"

    def pair(match: str, comment: str) -> None:
        rules.append(f"-A {CHAIN} {match} {_comment(comment)} -j CT --notrack")
        rules.extend(queued(match, comment, client_steer_match(i, count), i) for i in range(count))

    for front in config.frontends.values():
        if ipaddress.IPv4Address(front.listen_addr.host).is_unspecified:
            raise ConfigError(
                config.path,
                f"frontends.{front.name}.listen_addr",
                f"{front.listen_addr} means every address; {mode} mode needs the VIP as a specific address",
            )
        vip = front.listen_addr
        pair(f"-d {vip.host}/32 -p tcp -m tcp --dport {vip.port}", f"convey frontend {front.name}")
    if mode == Mode.PASSTHROUGH:
        # The servers' replies: each worker's slice of the port range goes to its queue.
        slices = return_port_ranges(config, count)
        for (match, comment), *by_worker in zip(
            _return_matches(config), *(_return_matches(config, ports) for ports in slices), strict=True
        ):
            rules.append(f"-A {CHAIN} {match} {_comment(comment)} -j CT --notrack")
            rules.extend(queued(m, c, "", i) for i, (m, c) in enumerate(by_worker))
        # ICMP errors: queued without CT --notrack (see the module doc); from lo: OUTPUT_CHAIN had them
        rules += _icmp_rules(config, CHAIN, "! -i lo", bypass)
    return rules


def _icmp_rules(config: Config, chain: str, iface: str, bypass: str) -> list[str]:
    """Passthrough: the ICMP error rules of ``chain``, steered to the worker whose flow the error quotes."""
    count = workers_for(config, Mode.PASSTHROUGH)
    base = _queue_num(config, Mode.PASSTHROUGH)
    rules = []
    for match, comment in _icmp_matches(config, iface):
        for i in range(count):
            for steer in icmp_steer_matches(config, Mode.PASSTHROUGH, i, count):
                full = f"{match} {steer}" if steer else match
                rules.append(
                    f"-A {chain} {full} {_comment(comment)} -j NFQUEUE --queue-num {base + i}{bypass}"
                )
    return rules


def output_rules(config: Config, mode: str) -> list[str]:
    """The rules of :data:`OUTPUT_CHAIN` (passthrough only, else empty): ICMP errors the balancer's own kernel
    sends to a VIP or to its source addresses, which go out through ``lo``."""
    if packet_mode(mode) != Mode.PASSTHROUGH:
        return []
    return _icmp_rules(config, OUTPUT_CHAIN, "-o lo", " --queue-bypass")


def chains(config: Config, mode: str) -> dict[tuple[str, str], list[str]]:
    """The per-packet rule set by (table, chain): :data:`CHAIN`, and :data:`OUTPUT_CHAIN` in passthrough."""
    found = {(TABLE, CHAIN): chain_rules(config, mode)}
    output = output_rules(config, mode)
    if output:
        found[(TABLE, OUTPUT_CHAIN)] = output
    return found


def _icmp_matches(config: Config, iface: str) -> list[tuple[str, str]]:
    """Passthrough: ICMP errors to each VIP and to the balancer's source addresses (any local address when
    ``source_addrs`` is unset, as the return rules), on ``iface`` (``! -i lo`` or ``-o lo``)."""
    hosts = [f.listen_addr.host for f in config.frontends.values()] + list(config.passthrough.source_addrs)
    dests = [f"-d {host}/32" for host in dict.fromkeys(hosts)]
    local = "" if config.passthrough.source_addrs else " -m addrtype --dst-type LOCAL"
    matches = []
    for dest in [*dests, *([""] if local else [])]:
        target = dest.removeprefix("-d ").removesuffix("/32") if dest else "the balancer"
        for kind in ICMP_ERRORS:
            match = f"{dest} {iface} -p icmp -m icmp --icmp-type {kind}{local if not dest else ''}".strip()
            matches.append((match, f"convey icmp errors to {target}"))
    return matches


def _return_matches(config: Config, span: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """Passthrough: the servers' replies to the ephemeral range (or ``span``, a worker's slice of it), one
    match per server address and source."""
    lo, hi = span or config.passthrough.port_range
    sources = config.passthrough.source_addrs or (None,)
    seen = set()
    matches = []
    for back_name in used_backends(config):
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
                matches.append((match, f"convey server {back_name}/{server.name}"))
    return matches


def render(config: Config, mode: str) -> str:
    """The rule set as ``iptables-restore --noflush`` input that touches only our chains and our jump rules.

    Loading it declares (and so empties) :data:`CHAIN` (and in passthrough :data:`OUTPUT_CHAIN`), fills them,
    and inserts the jumps at the top of PREROUTING (and OUTPUT); to load it again, remove the jumps first (or
    use ``rules.install``, which keeps exactly one each).
    """
    rules = chain_rules(config, mode)
    output = output_rules(config, mode)
    lines = [
        f"*{TABLE}",
        f":{CHAIN} - [0:0]",
        *([f":{OUTPUT_CHAIN} - [0:0]"] if output else []),
        *rules,
        *output,
        JUMP_RULE.replace("-A ", "-I ", 1).replace(HOOK, f"{HOOK} 1", 1),
    ]
    if output:
        lines.append(f"-I {OUTPUT_HOOK} 1 -m comment --comment {JUMP_COMMENT} -j {OUTPUT_CHAIN}")
    return "\n".join([*lines, "COMMIT", ""])


def show(config: Config, mode: str) -> str:
    """The rule set with comments saying what else install does; valid ``iptables-restore`` input."""
    mode = packet_mode(mode)
    lines = [
        f"# convey {mode} mode: iptables rules rendered from {config.path}",
        "# Load with `convey rules install` (idempotent), or: iptables-restore --noflush < this-file",
        "# (a second plain load adds a second jump rule; remove it with `convey rules remove`).",
        "#",
        "# install also sets these sysctls (remove restores them):",
    ]
    for key, value in _described_sysctls(config, mode):
        lines.append(f"#   {key} = {value}")
    if uses_marks(config, mode):
        lines.append("#")
        lines.append("# and policy routing for dsr.rewrite = mac (the verdict marks packets per server):")
        lines.append(
            f"#   ip rule add pref {LOCAL_RULE_PREF} lookup local && ip rule del pref 0 lookup local"
        )
        for route in mark_plan(config):
            lines.append(
                f"#   ip rule add pref {MARK_RULE_PREF} fwmark {route.selector()} lookup {route.table}"
            )
            lines.append(f"#   ip route add default via {route.gateway} table {route.table}")
    lines.append("")
    return "\n".join(lines) + render(config, mode)


def _described_sysctls(config: Config, mode: Mode) -> list[tuple[str, str]]:
    items = [(IP_FORWARD, "1")]
    if mode == Mode.PASSTHROUGH:
        lo, hi = config.passthrough.port_range
        items.append(("net.ipv4.conf.all.accept_local", "1"))
        items.append(("net.ipv4.conf.<interfaces to servers and holding the VIPs>.accept_local", "1"))
        items.append(("net.ipv4.conf.{all,<those interfaces>}.rp_filter", "2 where it is 1 (strict)"))
        items.append((RESERVED_PORTS, f"(existing list)+{lo}-{hi}"))
    else:
        items.append(("net.ipv4.conf.all.send_redirects", "0"))
        items.append(("net.ipv4.conf.<interfaces to servers and holding the VIPs>.send_redirects", "0"))
    return items


# -- DSR marks -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarkRoute:
    mark: int
    table: int
    gateway: str  # the server address
    servers: tuple[tuple[str, str], ...]  # (backend, server name) sharing that address
    mask: int = FULL_MARK  # the fwmark bits the ip rule compares (see fwmark_mask)

    def selector(self) -> str:
        """The ip rule's fwmark selector as ``ip rule`` prints it: ``0x10``, or ``0x10/0xffffff``."""
        return f"{self.mark:#x}" if self.mask == FULL_MARK else f"{self.mark:#x}/{self.mask:#x}"


def fwmark_mask(config: Config) -> int:
    """The fwmark bits DSR ``rewrite = "mac"``'s ip rules compare: the whole mark, except with offload and
    several workers, whose marks carry the worker's number in bits 24-31 (``rules.offload.WORKER_FIELD``) on
    every packet (the connmark restored into the fwmark): then bits 0-23, the server's mark."""
    if offloaded(config, Mode.DSR) and workers_for(config, Mode.DSR) > 1:
        return SERVER_MARK_BITS
    return FULL_MARK


def mark_plan(config: Config, marks: Mapping[str, int] | None = None) -> list[MarkRoute]:
    """One mark and table per distinct server address, in config order (all backends).

    Without ``marks`` the index of an address in config order picks its mark (``dsr.fwmark_base + index``) and
    table (``dsr.route_table_base + index``). ``marks`` (address -> mark, e.g. an earlier plan's, see
    :func:`convey.dataplane.rules.offload.offload_plan`) keeps those addresses on their marks across a reload;
    the others take the lowest free indexes. The table always follows the mark's index.
    """
    by_host: dict[str, list[tuple[str, str]]] = {}
    for back in config.backends.values():
        for server in back.servers:
            by_host.setdefault(server.addr.host, []).append((back.name, server.name))
    base = config.dsr.fwmark_base
    mask = fwmark_mask(config)
    given = dict(marks or {})
    taken = {mark - base for mark in given.values()}
    indexes: dict[str, int] = {}
    free = 0
    for host in by_host:
        if host in given:
            indexes[host] = given[host] - base
            continue
        while free in taken:
            free += 1
        indexes[host] = free
        taken.add(free)
    plan: list[MarkRoute] = []
    for host, servers in by_host.items():
        index = indexes[host]
        table = config.dsr.route_table_base + index
        if table in RESERVED_TABLES or table > 0xFFFFFFFF:
            raise ConfigError(
                config.path,
                "dsr.route_table_base",
                f"server {servers[0][0]}/{servers[0][1]} would use route table {table}, which is reserved "
                "(253 default, 254 main, 255 local); choose a base so that base..base+servers-1 avoids them",
            )
        mark = base + index
        if index < 0 or mark > 0xFFFFFFFF:
            raise ConfigError(config.path, "dsr.fwmark_base", f"fwmark {mark:#x} does not fit in 32 bits")
        plan.append(MarkRoute(mark, table, host, tuple(servers), mask))
    return plan


def server_marks(config: Config) -> dict[tuple[str, str], int]:
    """The fwmark the DSR data plane sets for each (backend, server name).

    One mark per distinct server address, ``dsr.fwmark_base + index`` in config order over all backends;
    servers sharing an address share its mark (and its route table, ``dsr.route_table_base + index``).
    """
    return {key: route.mark for route in mark_plan(config) for key in route.servers}
