"""The flow offload rule sets and their mark plan, rendered from a config: pure, no I/O (tests/unit).

With offload only a connection's first packet reaches convey; its verdict sets a mark naming the server (and,
passthrough, the balancer source address); the kernel keeps that mark in the connection's conntrack entry
(connmark) and conntrack carries every later packet. Measured and explained in iptables/README.md:

- **passthrough**: ``raw`` gives a SYN's new entry the events ``mark,destroy`` only; ``mangle`` lets an
  established segment without FIN, SYN or RST leave at its first rule, drops INVALID packets both ways, queues
  packets of NEW entries without a connmark (``--queue-bypass``) and ORs the close bits into the connmark at FIN
  and RST; ``nat PREROUTING`` saves the mark into the connmark and DNATs by the
  server field; ``nat POSTROUTING`` SNATs by the source field (``port_range``), or MASQUERADEs into
  ``port_range`` when ``source_addrs`` is empty (the route's source address, as the per-packet mode). Never
  ``--random-fully``.
- **DSR**: ``raw`` notracks the SYN only (convey creates the entry over ctnetlink); ``mangle`` restores the
  connmark into the fwmark and queues what is still unmarked (no bypass); ``nat`` saves the mark of a pickup and,
  ``rewrite = "ip"``, DNATs by mark. ``rewrite = "mac"`` routes by the fwmark with the per-packet policy routing.

Every chain is convey's own (:data:`OFFLOAD_CHAINS`) with one jump from its built-in chain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from convey.config import Config, ConfigError, workers_for
from convey.dataplane.rules import byte_counters
from convey.dataplane.rules.ruleset import (
    IP_FORWARD,
    LOCAL_RULE_PREF,
    MARK_RULE_PREF,
    OUTPUT_CHAIN,
    OUTPUT_HOOK,
    RESERVED_PORTS,
    RulesError,
    _comment,
    _queue_num,
    _return_matches,
    fwmark_mask,
    mark_plan,
    packet_mode,
    uses_marks,
)
from convey.modes import Mode
from convey.workers.slices import client_steer_match

PREROUTING_CHAIN = "CONVEY-PREROUTING"
POSTROUTING_CHAIN = "CONVEY-POSTROUTING"

ChainKey = tuple[str, str]  # (table, our chain)
HOOKS: dict[ChainKey, str] = {
    ("raw", PREROUTING_CHAIN): "PREROUTING",
    ("mangle", PREROUTING_CHAIN): "PREROUTING",
    ("nat", PREROUTING_CHAIN): "PREROUTING",
    ("nat", POSTROUTING_CHAIN): "POSTROUTING",
    ("raw", OUTPUT_CHAIN): OUTPUT_HOOK,  # per-packet passthrough: the balancer's own ICMP errors
}
"""Every chain convey may own, with the built-in chain that jumps to it (install and remove walk them all)."""

OFFLOAD_CHAINS: dict[Mode, tuple[ChainKey, ...]] = {
    Mode.PASSTHROUGH: (
        ("raw", PREROUTING_CHAIN),
        ("mangle", PREROUTING_CHAIN),
        ("nat", PREROUTING_CHAIN),
        ("nat", POSTROUTING_CHAIN),
    ),
    Mode.DSR: (("raw", PREROUTING_CHAIN), ("mangle", PREROUTING_CHAIN), ("nat", PREROUTING_CHAIN)),
}

# passthrough marks: the server in bits 8-20, the source address in bits 0-7 (N + M nat rules, not N * M)
PASSTHROUGH_MASK = 0xFFFFFF
SERVER_SHIFT = 8
SERVER_FIELD = 0x1FFF00
SOURCE_FIELD = 0xFF
# passthrough close bits (21-23): mangle ORs CLOSE_ORIG into the connmark at the client's FIN, CLOSE_REPLY at
# the server's, RESET_SEEN at a RST. An entry made at a SYN reports only its mark changes and its DESTROY (raw's
# ``CT --ctevents destroy,mark``), not an UPDATE per TCP state (about five per connection, each built by the
# kernel and read by convey): both FIN bits are the close; a RST's change is one when it carries the state CLOSE
# (a RST in the window but off the exact sequence number leaves the entry ESTABLISHED, and its event carries no
# state: a forged one ends nothing)
RESET_SEEN = 0x200000
CLOSE_ORIG = 0x400000
CLOSE_REPLY = 0x800000
CLOSE_BITS = CLOSE_ORIG | CLOSE_REPLY
# with N > 1 worker processes, bits 24-31 name the worker (index + 1) that decided the connection: its conntrack
# events go to it alone (conntrack_bpf's filter), and the mask grows to the whole mark
WORKER_SHIFT = 24
WORKER_FIELD = 0xFF000000
MAX_OFFLOAD_WORKERS = WORKER_FIELD >> WORKER_SHIFT
# DSR marks: the whole mark names the server, or with workers bits 0-23 (the mac flavour's ip rules then compare
# only those: ruleset.fwmark_mask)
DSR_MASK = 0xFFFFFFFF


def byte_key_mask(plan: OffloadPlan) -> int:
    """Passthrough: the connmark bits the byte counters are keyed by (``rules.byte_counters``): the server,
    source address and worker, not the close bits (a connection's counter must not change at its FIN)."""
    return plan.mask & ~(CLOSE_BITS | RESET_SEEN)


def render_byte_counters(plan: OffloadPlan) -> str:
    """Passthrough: the nft table of the byte counters for ``plan`` (``nft -f`` input)."""
    return byte_counters.render(SERVER_FIELD, byte_key_mask(plan))


def worker_bits(index: int) -> int:
    """The mark bits of worker ``index`` (0-based) of several (passthrough offload)."""
    return (index + 1) << WORKER_SHIFT


CT_ACCT = "net.netfilter.nf_conntrack_acct"
CT_EVENTS = "net.netfilter.nf_conntrack_events"
CT_LOOSE = "net.netfilter.nf_conntrack_tcp_loose"
CT_ESTABLISHED = "net.netfilter.nf_conntrack_tcp_timeout_established"


@dataclass(frozen=True)
class OffloadPlan:
    """Which mark names which server (and, passthrough, which source address); stable across reloads.

    ``mark(server, source)`` is the whole mark a first packet gets (``source``: the index of its address in
    ``sources``; 0 when ``sources`` is empty); ``server_of(connmark)`` names the server again. A server removed
    from the config but still draining (``keep``) stays in ``servers`` so its connections are still attributed.
    """

    mask: int  # the mark bits convey owns (connmark and fwmark)
    servers: Mapping[str, int]  # server id "backend/server" -> its mark bits
    sources: tuple[str, ...] = ()  # passthrough SNAT source addresses (empty = MASQUERADE)
    server_mask: int = DSR_MASK  # the bits of a mark naming the server
    _by_mark: Mapping[int, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        by_mark: dict[int, str] = {}
        for server, bits in self.servers.items():
            by_mark.setdefault(bits, server)  # DSR mac: servers sharing an address share a mark
        object.__setattr__(self, "_by_mark", by_mark)

    def mark(self, server_id: str, source: int = 0) -> int:
        """The full mark a first packet gets; KeyError for a server without a mark, ValueError for a source
        index out of range."""
        bits = self.servers[server_id]
        if not self.sources:
            if source != 0:
                raise ValueError(f"source index {source}: this plan has no source addresses")
            return bits
        if not 0 <= source < len(self.sources):
            raise ValueError(f"source index {source} out of range 0..{len(self.sources) - 1}")
        return bits | (source + 1)

    def source_index(self, addr: str) -> int:
        """The index of a source address in ``sources`` (what :meth:`mark` takes); 0 when there are none."""
        return self.sources.index(addr) if self.sources else 0

    def server_of(self, mark: int) -> str | None:
        """The server id a connmark names, or None when the mark is none of ours."""
        return self._by_mark.get(mark & self.server_mask)


def server_ids(config: Config) -> list[str]:
    """Every server of every backend as ``backend/server``, in config order."""
    return [f"{back.name}/{server.name}" for back in config.backends.values() for server in back.servers]


def offload_plan(
    config: Config, mode: str, previous: OffloadPlan | None = None, keep: Collection[str] = ()
) -> OffloadPlan:
    """The mark plan of ``mode``'s offload for ``config``.

    A server keeps its mark from ``previous``; a server of ``previous`` that left the config keeps (and
    reserves) its mark while it is in ``keep``; new servers take the lowest free marks. Passthrough: server
    slots 1.. in bits 8-20, source index + 1 in bits 0-7. DSR ``ip``: ``dsr.fwmark_base + slot``. DSR ``mac``:
    the policy routing's marks, one per server address (:func:`~.ruleset.mark_plan`), kept stable the same way.
    """
    mode = packet_mode(mode)
    old = dict(previous.servers) if previous is not None else {}
    ids = server_ids(config)
    kept = {sid: bits for sid, bits in old.items() if sid not in ids and sid in keep}
    if mode == Mode.PASSTHROUGH:
        sources = config.passthrough.source_addrs
        if len(sources) > SOURCE_FIELD:
            raise ConfigError(
                config.path, "passthrough.source_addrs", f"offload allows at most {SOURCE_FIELD} addresses"
            )
        servers = _allocate(ids, old, kept, 1 << SERVER_SHIFT, 1 << SERVER_SHIFT, SERVER_FIELD)
        mask = PASSTHROUGH_MASK | (WORKER_FIELD if workers_for(config, mode) > 1 else 0)
        return OffloadPlan(mask, servers, sources, SERVER_FIELD)
    if uses_marks(config, mode):  # with workers the ip rules compare bits 0-23 only (ruleset.fwmark_mask)
        return OffloadPlan(DSR_MASK, _mac_marks(config, old, kept), (), fwmark_mask(config))
    base = config.dsr.fwmark_base
    if workers_for(config, mode) > 1:  # ip with workers: the server in bits 0-23, the worker in 24-31
        server_mask = DSR_MASK & ~WORKER_FIELD
        return OffloadPlan(DSR_MASK, _allocate(ids, old, kept, base, 1, server_mask), (), server_mask)
    return OffloadPlan(DSR_MASK, _allocate(ids, old, kept, base, 1, DSR_MASK), (), DSR_MASK)


def _allocate(
    ids: list[str], old: Mapping[str, int], kept: Mapping[str, int], first: int, step: int, limit: int
) -> dict[str, int]:
    """Marks ``first + k * step`` (k = 0, 1, ...) up to ``limit``: old ones kept, the lowest free ones for new."""
    result = dict(kept)
    for sid in ids:
        if sid in old:
            result[sid] = old[sid]
    taken = set(result.values())
    mark = first
    for sid in ids:
        if sid in result:
            continue
        while mark in taken:
            mark += step
        if mark > limit:
            raise RulesError(f"offload: no free mark for server {sid} (more than {limit // step} servers)")
        result[sid] = mark
        taken.add(mark)
    return {sid: result[sid] for sid in [*ids, *kept]}


def _mac_marks(config: Config, old: Mapping[str, int], kept: Mapping[str, int]) -> dict[str, int]:
    """DSR mac: the routing's mark of each server's address, previous marks kept per address."""
    hosts: dict[str, int] = {}
    for back in config.backends.values():
        for server in back.servers:
            sid = f"{back.name}/{server.name}"
            if sid in old:
                hosts.setdefault(server.addr.host, old[sid])
    reserved = {f"kept:{sid}": bits for sid, bits in kept.items() if bits not in hosts.values()}
    result = {
        f"{b}/{s}": route.mark for route in mark_plan(config, {**reserved, **hosts}) for b, s in route.servers
    }
    return {**result, **kept}


def host_marks(config: Config, plan: OffloadPlan) -> dict[str, int]:
    """DSR mac: server address -> mark in ``plan`` (what :func:`~.ruleset.mark_plan` takes to keep them)."""
    marks: dict[str, int] = {}
    for back in config.backends.values():
        for server in back.servers:
            bits = plan.servers.get(f"{back.name}/{server.name}")
            if bits is not None:
                marks.setdefault(server.addr.host, bits)
    for sid, bits in plan.servers.items():  # reserve the draining servers' marks
        if bits not in marks.values():
            marks[f"kept:{sid}"] = bits
    return marks


# -- the rules -----------------------------------------------------------------------------------------------


def _frontends(config: Config, mode: Mode) -> list[tuple[str, str]]:
    """(match, comment) per frontend; ConfigError for a VIP of 0.0.0.0."""
    found = []
    for front in config.frontends.values():
        if ipaddress.IPv4Address(front.listen_addr.host).is_unspecified:
            raise ConfigError(
                config.path,
                f"frontends.{front.name}.listen_addr",
                f"{front.listen_addr} means every address; {mode} mode needs the VIP as a specific address",
            )
        vip = front.listen_addr
        found.append((f"-d {vip.host}/32 -p tcp -m tcp --dport {vip.port}", f"convey frontend {front.name}"))
    return found


def _mask(value: int, mask: int) -> str:
    return f"{value:#x}" if mask == 0xFFFFFFFF else f"{value:#x}/{mask:#x}"


def _dnat_rules(config: Config, plan: OffloadPlan, chain: str) -> list[str]:
    rules = []
    for back in config.backends.values():
        for server in back.servers:
            sid = f"{back.name}/{server.name}"
            bits = plan.servers.get(sid)
            if bits is None:
                continue
            rules.append(
                f"-A {chain} -p tcp -m mark --mark {_mask(bits, plan.server_mask)} "
                f"{_comment(f'convey server {sid}')} -j DNAT --to-destination {server.addr}"
            )
    return rules


def _save_mark(chain: str, mask: int) -> str:
    return f"-A {chain} -m mark ! --mark {_mask(0, mask)} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}"


def passthrough_chains(config: Config, plan: OffloadPlan) -> dict[ChainKey, list[str]]:
    """The passthrough offload rules per (table, chain), each as iptables-save prints it."""
    mask, chain, post = plan.mask, PREROUTING_CHAIN, POSTROUTING_CHAIN
    fronts = _frontends(config, Mode.PASSTHROUGH)
    base, count = _queue_num(config, Mode.PASSTHROUGH), workers_for(config, Mode.PASSTHROUGH)
    syn = "--tcp-flags FIN,SYN,RST,ACK SYN"
    raw = [f"-A {chain} {m} {syn} {_comment(c)} -j CT --ctevents destroy,mark" for m, c in fronts]
    mangle = [_ESTABLISHED_RETURN.format(chain=chain)]
    mangle += [f"-A {chain} {m} -m conntrack --ctstate INVALID {_comment(c)} -j DROP" for m, c in fronts]
    mangle += [
        f"-A {chain} {m} -m conntrack --ctstate INVALID {_comment(c)} -j DROP"
        for m, c in _return_matches(config)
    ]
    for m, c in fronts:  # one queue per worker, by client port bits (convey.workers.slices)
        for i in range(count):
            steer = client_steer_match(i, count)
            mangle.append(
                f"-A {chain} {m}{' ' + steer if steer else ''} -m conntrack --ctstate NEW -m connmark --mark "
                f"{_mask(0, mask)} {_comment(c)} -j NFQUEUE --queue-num {base + i} --queue-bypass"
            )
    mangle += _close_rules(chain)
    nat_pre = [_save_mark(chain, mask), *_dnat_rules(config, plan, chain)]
    lo, hi = config.passthrough.port_range
    if plan.sources:
        nat_post = [
            f"-A {post} -p tcp -m mark --mark {_mask(index + 1, SOURCE_FIELD)} "
            f"{_comment(f'convey source {addr}')} -j SNAT --to-source {addr}:{lo}-{hi}"
            for index, addr in enumerate(plan.sources)
        ]
    else:
        nat_post = [
            f"-A {post} -p tcp -m mark ! --mark {_mask(0, plan.server_mask)} "
            f"{_comment('convey route source')} -j MASQUERADE --to-ports {lo}-{hi}"
        ]
    return {("raw", chain): raw, ("mangle", chain): mangle, ("nat", chain): nat_pre, ("nat", post): nat_post}


# Most packets of an offloaded connection are established segments without FIN, SYN or RST: none of the rules
# below applies to them (INVALID drops, NEW queueing, close bits), so they leave the chain at its first rule
# instead of being matched against all of them. Measured with bench-like short connections, interleaved in one
# run: +4.6% connections/s (median of 8 pairs; nft_do_chain was ~2.5% of the machine's samples, 0.6% with
# kernel NAT).
_ESTABLISHED_RETURN = (
    "-A {chain} -p tcp -m tcp --tcp-flags FIN,SYN,RST NONE -m conntrack --ctstate ESTABLISHED "
    + _comment("convey established segment: nothing below applies")
    + " -j RETURN"
)


def _close_rules(chain: str) -> list[str]:
    """Passthrough: the close bits ORed into the connmark of our entries (a server field set): at a FIN by
    direction, at a RST ``RESET_SEEN``. After the INVALID drops: a RST or FIN out of the window sets none."""
    ours = f"-m connmark ! --mark {_mask(0, SERVER_FIELD)}"
    flags = "-p tcp -m tcp --tcp-flags"
    return [
        f"-A {chain} {flags} RST RST {ours} {_comment('convey close: reset')} "
        f"-j CONNMARK --set-xmark {RESET_SEEN:#x}/{RESET_SEEN:#x}",
        *(
            f"-A {chain} {flags} FIN FIN -m conntrack --ctdir {way.upper()} {ours} "
            f"{_comment(f'convey close: {way} fin')} -j CONNMARK --set-xmark {bit:#x}/{bit:#x}"
            for way, bit in (("original", CLOSE_ORIG), ("reply", CLOSE_REPLY))
        ),
    ]


def dsr_chains(config: Config, plan: OffloadPlan) -> dict[ChainKey, list[str]]:
    """The DSR offload rules per (table, chain), each as iptables-save prints it."""
    mask, chain = plan.mask, PREROUTING_CHAIN
    fronts = _frontends(config, Mode.DSR)
    syn = "--tcp-flags FIN,SYN,RST,ACK SYN"
    raw = [f"-A {chain} {m} {syn} {_comment(c)} -j CT --notrack" for m, c in fronts]
    restore = f"-j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}"
    base, count = _queue_num(config, Mode.DSR), workers_for(config, Mode.DSR)
    mangle = []
    for m, c in fronts:
        mangle.append(f"-A {chain} {m} {_comment(c)} {restore}")
        for i in range(count):  # one queue per worker, by client port bits (convey.workers.slices)
            steer = client_steer_match(i, count)
            mangle.append(
                f"-A {chain} {m}{' ' + steer if steer else ''} -m mark --mark {_mask(0, mask)} {_comment(c)} "
                f"-j NFQUEUE --queue-num {base + i}"
            )
    nat = [_save_mark(chain, mask)]
    if not uses_marks(config, Mode.DSR):
        nat += _dnat_rules(config, plan, chain)
    return {("raw", chain): raw, ("mangle", chain): mangle, ("nat", chain): nat}


def chains(config: Config, mode: str, plan: OffloadPlan | None = None) -> dict[ChainKey, list[str]]:
    """``mode``'s offload rules per (table, chain) with ``plan`` (None: :func:`offload_plan` of ``config``)."""
    mode = packet_mode(mode)
    plan = plan if plan is not None else offload_plan(config, mode)
    return passthrough_chains(config, plan) if mode == Mode.PASSTHROUGH else dsr_chains(config, plan)


def jump_rule(key: ChainKey) -> str:
    """The one rule jumping from the built-in chain to ours, as iptables-save prints it."""
    return f"-A {HOOKS[key]} -m comment --comment convey -j {key[1]}"


def restore_text(wanted: Mapping[ChainKey, list[str]]) -> str:
    """``iptables-restore --noflush`` input declaring (emptying) and filling each chain, one jump inserted."""
    lines: list[str] = []
    for table in dict.fromkeys(table for table, _ in wanted):
        keys = [key for key in wanted if key[0] == table]
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for _, chain in keys]
        for key in keys:
            lines += wanted[key]
        for key in keys:
            lines.append(jump_rule(key).replace("-A ", "-I ", 1).replace(HOOKS[key], f"{HOOKS[key]} 1", 1))
        lines.append("COMMIT")
    return "\n".join([*lines, ""])


def render(config: Config, mode: str, plan: OffloadPlan | None = None) -> str:
    """The offload rule set as ``iptables-restore --noflush`` input (touches only our chains and jumps)."""
    return restore_text(chains(config, mode, plan))


# -- sysctls -------------------------------------------------------------------------------------------------


def sysctls(config: Config, mode: Mode) -> dict[str, str]:
    """The conntrack settings offload needs besides the mode's own (all per network namespace).

    acct before any entry exists (counters), events=1 (events also for entries made while nobody listened:
    a restart), loose=1 (a packet without an entry is picked up and reaches convey rather than being INVALID).
    DSR also bounds an ESTABLISHED entry's idle life by ``[dsr] idle_timeout`` (as the per-packet flow table
    does): a client that vanishes without FIN or RST would otherwise hold its entry for 5 days; a later
    packet of a connection idle longer is picked up again and Maglev sends it to the same server.
    """
    wanted = {CT_ACCT: "1", CT_EVENTS: "1", CT_LOOSE: "1"}
    if mode == Mode.DSR:
        wanted[CT_ESTABLISHED] = str(max(1, round(config.dsr.idle_timeout)))
    return wanted


def described_sysctls(config: Config, mode: Mode) -> list[tuple[str, str]]:
    items = [(IP_FORWARD, "1"), *sysctls(config, mode).items()]
    if mode == Mode.PASSTHROUGH:
        lo, hi = config.passthrough.port_range
        items.append((RESERVED_PORTS, f"(existing list)+{lo}-{hi}"))
    else:
        items.append(("net.ipv4.conf.all.send_redirects", "0"))
        items.append(("net.ipv4.conf.<interfaces to servers and holding the VIPs>.send_redirects", "0"))
    return items


def show(config: Config, mode: str, plan: OffloadPlan | None = None) -> str:
    """The offload rule set with comments saying what else install does; valid ``iptables-restore`` input."""
    mode = packet_mode(mode)
    plan = plan if plan is not None else offload_plan(config, mode)
    lines = [
        f"# convey {mode} mode with flow offload: iptables rules rendered from {config.path}",
        "# Load with `convey rules install --offload` (idempotent), or: iptables-restore --noflush < this-file",
        "# (a second plain load adds second jump rules; remove them with `convey rules remove`).",
        f"# Marks: convey owns the bits {plan.mask:#x} of the fwmark and connmark; per server:",
    ]
    lines += [f"#   {sid} = {bits:#x}" for sid, bits in plan.servers.items()]
    lines += [f"#   source {addr} = {index + 1:#x}" for index, addr in enumerate(plan.sources)]
    if mode == Mode.PASSTHROUGH:
        lines.append(
            f"#   close bits = {CLOSE_BITS | RESET_SEEN:#x} (ORed in at a FIN or a RST: the close's event)"
        )
    if mode == Mode.PASSTHROUGH:
        lines += ["#", "# install also makes this nftables table, the byte counters (remove deletes it):"]
        lines += [f"#   {line.expandtabs(4)}" for line in render_byte_counters(plan).splitlines()]
    lines += ["#", "# install also sets these sysctls (remove restores them):"]
    lines += [f"#   {key} = {value}" for key, value in described_sysctls(config, mode)]
    if uses_marks(config, mode):
        lines += ["#", "# and policy routing for dsr.rewrite = mac (the connmark restored into the fwmark):"]
        lines.append(
            f"#   ip rule add pref {LOCAL_RULE_PREF} lookup local && ip rule del pref 0 lookup local"
        )
        for route in mark_plan(config, host_marks(config, plan)):
            lines.append(
                f"#   ip rule add pref {MARK_RULE_PREF} fwmark {route.selector()} lookup {route.table}"
            )
            lines.append(f"#   ip route add default via {route.gateway} table {route.table}")
    lines.append("")
    return "\n".join(lines) + render(config, mode, plan)
