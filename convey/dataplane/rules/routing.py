"""Routing on the balancer, through pyroute2: the interfaces a rule set involves, and DSR ``rewrite = "mac"``
policy routing.

The verdict marks a packet for server *i* with ``fwmark_base + i``; an ``ip rule fwmark M lookup T`` (pref
:data:`MARK_RULE_PREF`; ``fwmark M/0xffffff`` with offload and several workers, whose marks carry the worker's
number in bits 24-31: :func:`~.ruleset.fwmark_mask`) sends it through table ``route_table_base + i``, whose
only route is ``default via
<server>``, so the frame goes to the server's MAC with the destination IP still the VIP. The VIP is local, so
these rules must come before the ``local`` rule, which sits at pref 0 by default: install moves it to
:data:`LOCAL_RULE_PREF`, right after our rules and still before every other rule, so unmarked traffic is routed
exactly as before. (Moving it to 32765 instead would put any existing policy rule in front of local delivery.)

What install added is recorded in the state file's ``routing`` dict (``marks``: mark, table, gateway, oif of
each, and the rule's fwmark mask when it is not the whole mark; ``local_moved``: from, to,
protocol) so that remove deletes exactly that. ``ipr`` is an ``IPRoute`` from
:func:`convey.dataplane.kernel_state.iproute`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convey.config import Config, ConfigError
from convey.dataplane.rules.ruleset import (
    FULL_MARK,
    LOCAL_RULE_PREF,
    MARK_RULE_PREF,
    RulesError,
    mark_plan,
    used_backends,
)

RT_TABLE_LOCAL = 255
RTPROT_STATIC = 4
RTN_LOCAL = 2
FR_ACT_TO_TBL = 1
AF_INET = 2

Routing = dict[str, Any]  # the state file's "routing" section
# one planned or installed mark: mark, table, gateway, oif (and mask, when not FULL_MARK)
Mark = dict[str, Any]

_SELECTORS = ("FRA_SRC", "FRA_DST", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_FWMARK", "FRA_SPORT_RANGE")


# -- routing facts -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    kind: int  # RTN_*
    oif: str | None
    gateway: str | None


def route_to(ipr: Any, addr: str) -> Route | None:
    try:
        msgs = ipr.route("get", dst=addr)
    except Exception:  # pyroute2 raises NetlinkError for "no route"
        return None
    for msg in msgs:
        index = msg.get_attr("RTA_OIF")
        return Route(int(msg["type"]), ifname(ipr, index) if index else None, msg.get_attr("RTA_GATEWAY"))
    return None


def ifname(ipr: Any, index: int) -> str | None:
    for link in ipr.get_links(index):
        name = link.get_attr("IFLA_IFNAME")
        return str(name) if name is not None else None
    return None


def _iface_of_address(ipr: Any, addr: str) -> str | None:
    for msg in ipr.get_addr(family=AF_INET):
        if addr in (msg.get_attr("IFA_LOCAL"), msg.get_attr("IFA_ADDRESS")):
            return ifname(ipr, msg["index"])
    return None


def involved_ifaces(ipr: Any, config: Config) -> tuple[list[str], list[str]]:
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
    for back_name in used_backends(config):
        for server in config.backends[back_name].servers:
            route = route_to(ipr, server.addr.host)
            if route is None or route.oif is None:
                warnings.append(f"warning: no route to server {back_name}/{server.name} ({server.addr.host})")
            elif route.oif != "lo" and route.oif not in names:
                names.append(route.oif)
    return names, warnings


def ip_rules(ipr: Any) -> list[dict[str, Any]]:
    """IPv4 ip rules as plain dicts: pref, table, fwmark, fwmask (FULL_MARK when the rule gives none), protocol,
    plain (no selector besides the table)."""
    result = []
    for msg in ipr.get_rules(family=AF_INET):
        plain = (
            msg["src_len"] == 0
            and msg["dst_len"] == 0
            and msg["tos"] == 0
            and msg["action"] == FR_ACT_TO_TBL
            and all(msg.get_attr(name) is None for name in _SELECTORS)
        )
        result.append(
            {
                "pref": msg.get_attr("FRA_PRIORITY") or 0,
                "table": msg.get_attr("FRA_TABLE") or msg["table"],
                "fwmark": msg.get_attr("FRA_FWMARK"),
                "fwmask": msg.get_attr("FRA_FWMASK", FULL_MARK),
                "protocol": msg.get_attr("FRA_PROTOCOL") or 0,
                "plain": plain,
            }
        )
    return result


def local_rule(rules: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r for r in rules if r["plain"] and r["table"] == RT_TABLE_LOCAL]
    return min(found, key=lambda r: r["pref"]) if found else None


def table_routes(ipr: Any, table: int) -> list[Any]:
    return [
        msg
        for msg in ipr.get_routes(family=AF_INET, table=table)
        if (msg.get_attr("RTA_TABLE") or msg["table"]) == table
    ]


# -- checks before anything changes --------------------------------------------------------------------------


def _plan_routes(ipr: Any, config: Config, marks: Mapping[str, int] | None = None) -> list[Mark]:
    """The mark plan with the interface of each server, checking each is on a directly connected network.
    ``marks``: address -> mark to keep (offload's plan across reloads, see ``mark_plan``)."""
    planned = []
    for route in mark_plan(config, marks):
        back, name = route.servers[0]
        key = f"backends.{back}.servers.{name}.addr"
        found = route_to(ipr, route.gateway)
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
        item: Mark = {"mark": route.mark, "table": route.table, "gateway": route.gateway, "oif": found.oif}
        if route.mask != FULL_MARK:
            item["mask"] = route.mask
        planned.append(item)
    return planned


def check(ipr: Any, config: Config, routing: Routing, marks: Mapping[str, int] | None = None) -> list[Mark]:
    """Everything that could stop the DSR mac routing, checked before anything changes; returns the plan."""
    planned = _plan_routes(ipr, config, marks)
    previous = routing.get("marks", [])
    rules = ip_rules(ipr)
    for item in planned:
        for rule in rules:
            if rule["fwmark"] == item["mark"] and rule["table"] != item["table"]:
                raise RulesError(
                    f"an ip rule (pref {rule['pref']}) already uses fwmark {selector(item)}; "
                    "choose another dsr.fwmark_base"
                )
        if table_routes(ipr, item["table"]) and item["table"] not in {m["table"] for m in previous}:
            raise RulesError(f"route table {item['table']} is not empty; choose another dsr.route_table_base")
    ours = {(m["mark"], m["table"]) for m in [*previous, *planned]}
    _local_rule_to_move(rules, ours)
    return planned


def _local_rule_to_move(rules: list[dict[str, Any]], ours: set[tuple[int, int]]) -> dict[str, Any] | None:
    """The `lookup local` rule when it must move from pref 0 to after our fwmark rules; None when it need not.

    Refuses when moving it would change how unmarked traffic is routed (another rule would come first)."""
    local = local_rule(rules)
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


# -- install and remove --------------------------------------------------------------------------------------


def install(ipr: Any, planned: list[Mark], routing: Routing) -> list[str]:
    """Set up ``planned`` (from :func:`check`), dropping what an earlier install set up and this one does not
    want; records it all in ``routing``. Returns what changed, one line each."""
    lines: list[str] = []
    wanted = [(i["mark"], mask_of(i), i["table"], i["gateway"], i["oif"]) for i in planned]
    for old in routing.get("marks", []):
        if (old["mark"], mask_of(old), old["table"], old["gateway"], old["oif"]) not in wanted:
            lines += _delete_mark(ipr, old)
    routing["marks"] = planned
    rules = ip_rules(ipr)
    for item in planned:
        lines += _add_mark(ipr, item, rules)
    # then local delivery moves after our rules: add the new one before deleting the old (always one there)
    local = _local_rule_to_move(ip_rules(ipr), {(m["mark"], m["table"]) for m in planned})
    if local is not None:
        protocol = local["protocol"]
        ipr.rule("add", family=AF_INET, priority=LOCAL_RULE_PREF, table=RT_TABLE_LOCAL, protocol=protocol)
        ipr.rule("del", family=AF_INET, priority=0, table=RT_TABLE_LOCAL)
        routing["local_moved"] = {"from": 0, "to": LOCAL_RULE_PREF, "protocol": protocol}
        lines.append(f"ip rule: moved `from all lookup local` from pref 0 to pref {LOCAL_RULE_PREF}")
    return lines


def _add_mark(ipr: Any, item: Mark, rules: list[dict[str, Any]]) -> list[str]:
    """The route and the ip rule of one mark, each added where missing."""
    lines = []
    index = ipr.link_lookup(ifname=item["oif"])[0]
    if not any(
        r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY") == item["gateway"] and r.get_attr("RTA_OIF") == index
        for r in table_routes(ipr, item["table"])
    ):
        ipr.route(
            "replace", dst="0.0.0.0/0", gateway=item["gateway"], oif=index, table=item["table"],
            proto=RTPROT_STATIC,
        )  # fmt: skip
        lines.append(
            f"ip route replace default via {item['gateway']} dev {item['oif']} table {item['table']}"
        )
    if not any(_is_rule_of(r, item) for r in rules):
        ipr.rule(
            "add", family=AF_INET, priority=MARK_RULE_PREF, fwmark=item["mark"], fwmask=mask_of(item),
            table=item["table"], protocol=RTPROT_STATIC,
        )  # fmt: skip
        lines.append(f"ip rule add pref {MARK_RULE_PREF} fwmark {selector(item)} lookup {item['table']}")
    return lines


def _delete_mark(ipr: Any, item: Mark) -> list[str]:
    lines = []
    for rule in ip_rules(ipr):
        if _is_rule_of(rule, item):
            ipr.rule(
                "del", family=AF_INET, priority=MARK_RULE_PREF, fwmark=item["mark"], fwmask=mask_of(item),
                table=item["table"],
            )  # fmt: skip
            lines.append(f"ip rule del pref {MARK_RULE_PREF} fwmark {selector(item)} lookup {item['table']}")
    for route in table_routes(ipr, item["table"]):
        if route["dst_len"] == 0 and route.get_attr("RTA_GATEWAY") == item["gateway"]:
            ipr.route("del", dst="0.0.0.0/0", gateway=item["gateway"], table=item["table"])
            lines.append(f"ip route del default via {item['gateway']} table {item['table']}")
    return lines


def mask_of(item: Mark) -> int:
    """The fwmark mask of a planned or recorded mark (state files before masks existed record none)."""
    return int(item.get("mask", FULL_MARK))


def selector(item: Mark) -> str:
    """A mark's ip rule selector as ``ip rule`` prints it: ``0x10``, or ``0x10/0xffffff``."""
    mask = mask_of(item)
    return f"{item['mark']:#x}" if mask == FULL_MARK else f"{item['mark']:#x}/{mask:#x}"


def _is_rule_of(rule: dict[str, Any], item: Mark) -> bool:
    """Whether an ip rule (from :func:`ip_rules`) is the one ``item``'s mark installs."""
    return bool(
        rule["fwmark"] == item["mark"]
        and rule["fwmask"] == mask_of(item)
        and rule["table"] == item["table"]
        and rule["pref"] == MARK_RULE_PREF
    )


def remove(ipr: Any, routing: Routing) -> list[str]:
    """Undo what ``routing`` records (and forget it): the local rule back to its pref, our marks gone."""
    lines = []
    moved = routing.pop("local_moved", None)
    if moved:
        at = {r["pref"] for r in ip_rules(ipr) if r["plain"] and r["table"] == RT_TABLE_LOCAL}
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


def guess(ipr: Any, config: Config) -> Routing:
    """Without a state file: what a DSR mac install of this config would have left (remove's fallback)."""
    marks = [
        {"mark": r.mark, "table": r.table, "gateway": r.gateway, "oif": "", "mask": r.mask}
        for r in mark_plan(config)
    ]
    routing: Routing = {"marks": marks}
    local = local_rule(ip_rules(ipr))
    if local is not None and local["pref"] == LOCAL_RULE_PREF:
        routing["local_moved"] = {"from": 0, "to": LOCAL_RULE_PREF, "protocol": local["protocol"]}
    return routing


def problems(ipr: Any, config: Config, marks: Mapping[str, int] | None = None) -> list[str]:
    """What is missing of the DSR mac policy routing for ``config`` (``marks``: as for :func:`check`)."""
    found = []
    rules = ip_rules(ipr)
    local = local_rule(rules)
    for route in mark_plan(config, marks):
        mark_rules = [
            r
            for r in rules
            if r["fwmark"] == route.mark and r["fwmask"] == route.mask and r["table"] == route.table
        ]
        if not mark_rules:
            found.append(f"no ip rule fwmark {route.selector()} lookup {route.table}")
        elif local is not None and min(r["pref"] for r in mark_rules) >= local["pref"]:
            found.append(f"ip rule fwmark {route.selector()} comes after the `lookup local` rule")
        gateways = [r.get_attr("RTA_GATEWAY") for r in table_routes(ipr, route.table) if r["dst_len"] == 0]
        if route.gateway not in gateways:
            found.append(f"no route default via {route.gateway} in table {route.table}")
    return found
