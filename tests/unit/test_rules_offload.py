"""The flow offload rule sets and their mark plan (convey.dataplane.rules.offload): pure rendering, no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from convey import cli
from convey.config import ConfigError, load_config, parse_config, with_offload
from convey.dataplane import conntrack_check, rules
from convey.dataplane.conntrack_check import Missing, OffloadUnavailable
from convey.dataplane.rules import offload, offload_kernel, ruleset, sysctls
from convey.dataplane.rules.offload import OffloadPlan, offload_plan
from convey.modes import Mode

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "web"

[frontends.api]
listen_addr = "198.18.0.1:8443"
backend = "api"

[backends.web]
  [backends.web.servers.one]
  addr = "198.18.1.2:8080"
  [backends.web.servers.two]
  addr = "198.18.2.2:8080"

[backends.api]
  [backends.api.servers.one]
  addr = "198.18.1.2:9000"
  [backends.api.servers.three]
  addr = "198.18.3.2:9000"

[passthrough]
offload = true
port_range = "40000-50000"
queue_num = 7

[dsr]
offload = true
queue_num = 3
"""


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_passthrough_rules_queue_new_unmarked_connections_and_nat_by_mark() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    chains = offload.chains(cfg, "passthrough")
    assert list(chains) == [
        ("raw", "CONVEY-PREROUTING"),
        ("mangle", "CONVEY-PREROUTING"),
        ("nat", "CONVEY-PREROUTING"),
        ("nat", "CONVEY-POSTROUTING"),
    ]
    # a SYN's new entry reports only mark changes and its DESTROY
    assert chains[("raw", "CONVEY-PREROUTING")] == [
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 80 --tcp-flags FIN,SYN,RST,ACK SYN "
        '-m comment --comment "convey frontend web" -j CT --ctevents destroy,mark',
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 8443 --tcp-flags FIN,SYN,RST,ACK SYN "
        '-m comment --comment "convey frontend api" -j CT --ctevents destroy,mark',
    ]
    mangle = chains[("mangle", "CONVEY-PREROUTING")]
    # the close bits, after the INVALID drops: a FIN per direction, a RST its own
    assert mangle[-3:] == [
        "-A CONVEY-PREROUTING -p tcp -m tcp --tcp-flags RST RST -m connmark ! --mark 0x0/0x1fff00 "
        '-m comment --comment "convey close: reset" -j CONNMARK --set-xmark 0x200000/0x200000',
        "-A CONVEY-PREROUTING -p tcp -m tcp --tcp-flags FIN FIN -m conntrack --ctdir ORIGINAL -m connmark ! "
        '--mark 0x0/0x1fff00 -m comment --comment "convey close: original fin" -j CONNMARK --set-xmark '
        "0x400000/0x400000",
        "-A CONVEY-PREROUTING -p tcp -m tcp --tcp-flags FIN FIN -m conntrack --ctdir REPLY -m connmark ! "
        '--mark 0x0/0x1fff00 -m comment --comment "convey close: reply fin" -j CONNMARK --set-xmark '
        "0x800000/0x800000",
    ]
    fields = [offload.SOURCE_FIELD, offload.SERVER_FIELD, offload.RESET_SEEN, offload.CLOSE_BITS]
    assert sum(fields) == offload.PASSTHROUGH_MASK and all(
        a & b == 0 for a in fields for b in fields if a != b
    )
    queued = [rule for rule in mangle if "NFQUEUE" in rule]
    assert queued == [
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 80 -m conntrack --ctstate NEW -m connmark "
        '--mark 0x0/0xffffff -m comment --comment "convey frontend web" -j NFQUEUE --queue-num 7 --queue-bypass',
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 8443 -m conntrack --ctstate NEW -m connmark "
        '--mark 0x0/0xffffff -m comment --comment "convey frontend api" -j NFQUEUE --queue-num 7 --queue-bypass',
    ]
    drops = [rule for rule in mangle if rule.endswith("-j DROP")]
    assert all("--ctstate INVALID" in rule for rule in drops)
    assert len(drops) == 2 + 4  # both frontends, and replies from each server address:port to the range
    assert any(
        "-s 198.18.3.2/32 -p tcp -m tcp --sport 9000 --dport 40000:50000 -m addrtype" in r for r in drops
    )
    assert mangle.index(queued[0]) > mangle.index(drops[-1])  # INVALID dropped before anything is queued
    nat = chains[("nat", "CONVEY-PREROUTING")]
    assert nat[0] == (
        "-A CONVEY-PREROUTING -m mark ! --mark 0x0/0xffffff -j CONNMARK --save-mark --nfmask 0xffffff --ctmask 0xffffff"
    )
    assert nat[1:] == [
        '-A CONVEY-PREROUTING -p tcp -m mark --mark 0x100/0x1fff00 -m comment --comment "convey server web/one" '
        "-j DNAT --to-destination 198.18.1.2:8080",
        '-A CONVEY-PREROUTING -p tcp -m mark --mark 0x200/0x1fff00 -m comment --comment "convey server web/two" '
        "-j DNAT --to-destination 198.18.2.2:8080",
        '-A CONVEY-PREROUTING -p tcp -m mark --mark 0x300/0x1fff00 -m comment --comment "convey server api/one" '
        "-j DNAT --to-destination 198.18.1.2:9000",
        '-A CONVEY-PREROUTING -p tcp -m mark --mark 0x400/0x1fff00 -m comment --comment "convey server api/three" '
        "-j DNAT --to-destination 198.18.3.2:9000",
    ]
    # no source_addrs: the route's source address, as the per-packet mode, in the reserved range
    assert chains[("nat", "CONVEY-POSTROUTING")] == [
        '-A CONVEY-POSTROUTING -p tcp -m mark ! --mark 0x0/0x1fff00 -m comment --comment "convey route source" '
        "-j MASQUERADE --to-ports 40000-50000"
    ]
    assert "random-fully" not in offload.render(cfg, "passthrough")


def test_source_addrs_snat_by_the_source_field_n_plus_m_rules() -> None:
    cfg = parse_config(
        CONFIG.replace("queue_num = 7", 'queue_num = 7\nsource_addrs = ["198.18.1.1", "198.18.2.1"]')
    )
    chains = offload.chains(cfg, "passthrough")
    assert chains[("nat", "CONVEY-POSTROUTING")] == [
        '-A CONVEY-POSTROUTING -p tcp -m mark --mark 0x1/0xff -m comment --comment "convey source 198.18.1.1" '
        "-j SNAT --to-source 198.18.1.1:40000-50000",
        '-A CONVEY-POSTROUTING -p tcp -m mark --mark 0x2/0xff -m comment --comment "convey source 198.18.2.1" '
        "-j SNAT --to-source 198.18.2.1:40000-50000",
    ]
    assert len(chains[("nat", "CONVEY-PREROUTING")]) == 1 + 4  # 4 servers + 2 sources: 6 rules, not 8
    plan = offload_plan(cfg, "passthrough")
    assert plan.sources == ("198.18.1.1", "198.18.2.1")
    assert plan.mark("api/three", plan.source_index("198.18.2.1")) == 0x402
    assert plan.server_of(0x402) == "api/three"
    assert plan.server_of(0x402 | 0xFF000000) == "api/three"  # bits outside convey's mask are not ours
    assert (
        plan.server_of(0x402 | offload.CLOSE_BITS) == "api/three"
    )  # a closed connection still names its server
    assert plan.server_of(0x502) is None
    with pytest.raises(ValueError, match="out of range"):
        plan.mark("web/one", 2)
    # the INVALID drops on the return path are per source address, as the per-packet return rules
    mangle = chains[("mangle", "CONVEY-PREROUTING")]
    assert any("-s 198.18.1.2/32 -d 198.18.2.1/32 -p tcp" in rule for rule in mangle)


def test_dsr_ip_rules_notrack_the_syn_restore_the_mark_and_dnat_pickups() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    chains = offload.chains(cfg, "dsr")
    assert chains[("raw", "CONVEY-PREROUTING")][0] == (
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 80 --tcp-flags FIN,SYN,RST,ACK SYN "
        '-m comment --comment "convey frontend web" -j CT --notrack'
    )
    mangle = chains[("mangle", "CONVEY-PREROUTING")]
    assert mangle[:2] == [
        '-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment "convey frontend web" '
        "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-A CONVEY-PREROUTING -d 198.18.0.1/32 -p tcp -m tcp --dport 80 -m mark --mark 0x0 "
        '-m comment --comment "convey frontend web" -j NFQUEUE --queue-num 3',
    ]
    assert not any("bypass" in rule for rule in mangle)  # as the per-packet DSR rules: restarts keep flows
    nat = chains[("nat", "CONVEY-PREROUTING")]
    assert nat[0].endswith("-j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff")
    assert [rule.split("--mark ")[1].split()[0] for rule in nat[1:]] == ["0x100", "0x101", "0x102", "0x103"]
    assert nat[-1].endswith("-j DNAT --to-destination 198.18.3.2:9000")


def test_dsr_mac_marks_are_the_policy_routing_marks() -> None:
    cfg = parse_config(CONFIG.replace("queue_num = 3", 'queue_num = 3\nrewrite = "mac"'), "x.toml")
    plan = offload_plan(cfg, "dsr")
    routing = {f"{b}/{s}": mark for (b, s), mark in rules.server_marks(cfg).items()}
    assert (
        dict(plan.servers)
        == routing
        == {"web/one": 0x100, "web/two": 0x101, "api/one": 0x100, "api/three": 0x102}
    )
    assert plan.server_of(0x100) == "web/one"  # servers sharing an address share its mark and its route
    nat = offload.chains(cfg, "dsr")[("nat", "CONVEY-PREROUTING")]
    assert len(nat) == 1  # save-mark only: the fwmark routes, nothing is rewritten
    text = rules.show(cfg, "dsr")
    assert "ip rule add pref 100 fwmark 0x102 lookup 102" in text


def test_dsr_mac_marks_stay_across_a_reload_and_the_routes_follow() -> None:
    cfg = parse_config(CONFIG.replace("queue_num = 3", 'queue_num = 3\nrewrite = "mac"'), "x.toml")
    first = offload_plan(cfg, "dsr")
    # web/one and api/one (198.18.1.2) leave; 198.18.2.2 and 198.18.3.2 keep 0x101 and 0x102
    text = CONFIG.replace("queue_num = 3", 'queue_num = 3\nrewrite = "mac"')
    text = text.replace(
        '[backends.web.servers.one]\n  addr = "198.18.1.2:8080"',
        '[backends.web.servers.four]\n  addr = "198.18.4.2:8080"',
    )
    text = text.replace('[backends.api.servers.one]\n  addr = "198.18.1.2:9000"\n', "")
    moved = parse_config(text, "x.toml")
    # by index alone the new server would take the draining address's mark (and route) at once
    assert rules.server_marks(moved)[("web", "four")] == 0x100
    plan = offload_plan(moved, "dsr", first, keep=["web/one"])
    assert plan.servers["web/two"] == 0x101 and plan.servers["api/three"] == 0x102
    assert plan.servers["web/one"] == 0x100  # draining: reserved, still attributed
    assert plan.servers["web/four"] == 0x103  # 0x100 stays reserved while web/one drains
    routes = ruleset.mark_plan(moved, offload.host_marks(moved, plan))
    assert [(r.gateway, r.mark, r.table) for r in routes] == [
        ("198.18.4.2", 0x103, 103),
        ("198.18.2.2", 0x101, 101),
        ("198.18.3.2", 0x102, 102),
    ]
    later = offload_plan(moved, "dsr", plan)  # web/one done draining: its mark is free again
    assert "web/one" not in later.servers and later.servers["web/four"] == 0x103


def test_the_plan_keeps_marks_reserves_draining_ones_and_gives_new_servers_free_marks() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    first = offload_plan(cfg, "passthrough")
    assert first.mask == 0xFFFFFF and first.server_mask == 0x1FFF00
    assert dict(first.servers) == {"web/one": 0x100, "web/two": 0x200, "api/one": 0x300, "api/three": 0x400}
    assert offload_plan(cfg, "passthrough") == first  # pure and deterministic
    assert offload_plan(cfg, "passthrough", first) == first  # a reload without change changes nothing
    # web/two leaves (draining), web/five and api/six arrive
    text = CONFIG.replace("[backends.web.servers.two]", "[backends.web.servers.five]").replace(
        "[backends.api.servers.three]",
        '[backends.api.servers.six]\n  addr = "198.18.6.2:1"\n  [backends.api.servers.three]',
    )
    moved = parse_config(text, "x.toml")
    plan = offload_plan(moved, "passthrough", first, keep={"web/two"})
    assert plan.servers["web/one"] == 0x100 and plan.servers["api/three"] == 0x400
    assert plan.servers["web/two"] == 0x200 and plan.server_of(0x2FF) == "web/two"
    assert plan.servers["web/five"] == 0x500 and plan.servers["api/six"] == 0x600
    assert len(set(plan.servers.values())) == len(plan.servers)
    dnat = offload.chains(moved, "passthrough", plan)[("nat", "CONVEY-PREROUTING")]
    assert not any("web/two" in rule for rule in dnat)  # no new connection can go to a removed server
    done = offload_plan(moved, "passthrough", plan)  # drained: web/two's mark is free for the next newcomer
    assert "web/two" not in done.servers
    again = parse_config(
        text.replace("[backends.web.servers.five]", "[backends.web.servers.seven]"), "x.toml"
    )
    assert offload_plan(again, "passthrough", done).servers["web/seven"] == 0x200


def test_dsr_ip_plan_starts_at_fwmark_base() -> None:
    cfg = parse_config(CONFIG.replace("queue_num = 3", "queue_num = 3\nfwmark_base = 0x4000"), "x.toml")
    plan = offload_plan(cfg, "dsr")
    assert plan.mask == 0xFFFFFFFF
    assert list(plan.servers.values()) == [0x4000, 0x4001, 0x4002, 0x4003]
    assert plan.mark("api/one") == 0x4002 and plan.server_of(0x4002) == "api/one"
    with pytest.raises(ValueError):
        plan.mark("api/one", 1)


def test_render_show_and_per_packet_dispatch() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    for mode in rules.MODES:
        text = rules.show(cfg, mode)
        body = [line for line in text.splitlines() if not line.startswith("#")]
        assert "\n".join(body) + "\n" == rules.render(cfg, mode)
        assert "flow offload" in text
        assert text.count("-I PREROUTING 1 -m comment --comment convey -j CONVEY-PREROUTING") == (3)
    assert "net.netfilter.nf_conntrack_events = 1" in rules.show(cfg, "passthrough")
    assert "accept_local" not in rules.show(cfg, "passthrough")
    per_packet = parse_config(CONFIG.replace("offload = true", "offload = false"), "x.toml")
    assert rules.render(per_packet, "passthrough") == ruleset.render(per_packet, "passthrough")
    assert rules.render(with_offload(per_packet, "dsr"), "dsr") == rules.render(cfg, "dsr")
    plan = OffloadPlan(0xFFFFFF, {"web/one": 0x700}, (), 0x1FFF00)
    assert "--mark 0x700/0x1fff00" in rules.render(cfg, "passthrough", plan)


def test_a_vip_of_0000_is_rejected() -> None:
    cfg = parse_config(CONFIG.replace('"198.18.0.1:80"', '"0.0.0.0:80"'), "x.toml")
    for mode in rules.MODES:
        with pytest.raises(ConfigError, match=r"frontends\.web\.listen_addr"):
            rules.render(cfg, mode)


def test_offload_sysctls() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    now = {"net.ipv4.ip_local_reserved_ports": "", "net.ipv4.conf.all.rp_filter": "1"}
    want = sysctls.wanted(cfg, Mode.PASSTHROUGH, ["eth0"], {}, now.__getitem__, offload=True)
    assert want == {
        "net.ipv4.ip_forward": "1",
        "net.netfilter.nf_conntrack_acct": "1",
        "net.netfilter.nf_conntrack_events": "1",
        "net.netfilter.nf_conntrack_tcp_loose": "1",
        "net.ipv4.ip_local_reserved_ports": "40000-50000",
    }
    want = sysctls.wanted(cfg, Mode.DSR, ["eth0"], {}, now.__getitem__, offload=True)
    assert want["net.netfilter.nf_conntrack_tcp_timeout_established"] == "300"
    assert want["net.ipv4.conf.eth0.send_redirects"] == "0"
    assert "net.netfilter.nf_conntrack_acct" not in sysctls.wanted(cfg, Mode.DSR, [], {}, now.__getitem__)


def test_a_kernel_without_conntrack_is_named_with_how_to_get_it(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG, "x.toml")
    (tmp_path / "net").mkdir()
    (tmp_path / "net/ip_tables_targets").write_text("NFQUEUE\n")
    loaded: list[Path] = []
    with pytest.raises(OffloadUnavailable) as caught:
        offload_kernel.require_kernel(
            cfg, Mode.PASSTHROUGH, proc=tmp_path, load=loaded.append, loadable=lambda _: False, ctnetlink=None
        )
    assert loaded == [tmp_path]  # nf_conntrack is loaded first when its sysctls are missing
    assert "--passthrough --offload needs kernel features" in str(caught.value)
    assert "modprobe nf_conntrack" in str(caught.value) and "CONFIG_NF_CONNTRACK" in str(caught.value)
    for name in ("nf_conntrack_max", "nf_conntrack_acct", "nf_conntrack_events"):
        (tmp_path / "sys/net/netfilter").mkdir(parents=True, exist_ok=True)
        (tmp_path / "sys/net/netfilter" / name).write_text("1\n")
    with pytest.raises(OffloadUnavailable) as caught:
        offload_kernel.require_kernel(
            cfg, Mode.PASSTHROUGH, proc=tmp_path, load=loaded.append, loadable=lambda _: False, ctnetlink=None
        )
    message = str(caught.value)
    assert "xtables target CONNMARK" in message and "xtables target MASQUERADE" in message
    assert "xtables target NFQUEUE" not in message and "xtables target CT (passthrough" in message
    assert offload_kernel.needed_targets(cfg, Mode.PASSTHROUGH) == (
        "NFQUEUE",
        "CONNMARK",
        "CT",
        "DNAT",
        "MASQUERADE",
    )
    assert offload_kernel.needed_targets(cfg, Mode.DSR) == ("NFQUEUE", "CONNMARK", "CT", "DNAT")


def test_the_cli_says_what_the_kernel_lacks_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "convey.toml"
    path.write_text(CONFIG.replace("offload = true", "offload = false"))
    monkeypatch.setattr(rules.iptables, "check_tools", lambda: None)
    monkeypatch.setattr(
        conntrack_check, "missing", lambda *a, **k: [Missing("xtables target CONNMARK", "why", "how")]
    )
    status = cli.main(["rules", "install", "--passthrough", "--offload", f"--config={path}"])
    out, err = capsys.readouterr()
    assert status != 0 and "Traceback" not in out + err
    assert "--passthrough --offload needs kernel features this system lacks" in err
    assert "xtables target CONNMARK (why): how" in err


@pytest.mark.parametrize("mode", rules.MODES)
def test_the_checked_in_offload_rule_files_match_the_samples(mode: str) -> None:
    cfg = with_offload(load_config(ROOT / "samples" / f"sample-{mode}.toml"), mode)
    checked_in = (ROOT / "iptables" / f"{mode}-offload.rules").read_text()
    assert lines(checked_in, "-A ") == lines(rules.render(cfg, mode), "-A "), "regenerate: convey rules show"
