"""The iptables rule sets rendered from configs (no root, nothing installed), and the sysctl decisions they imply
(convey.dataplane.rules.ruleset and .sysctls; the sysctl I/O itself is in test_kernel_state.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from convey.config import ConfigError, load_config, parse_config
from convey.dataplane import rules
from convey.dataplane.rules import sysctls
from convey.modes import Mode

ROOT = Path(__file__).resolve().parents[2]

PASSTHROUGH = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "web_servers"

[frontends.api]
listen_addr = "198.18.0.1:8443"
backend = "api_servers"

[backends.web_servers]
  [backends.web_servers.servers.one]
  addr = "198.18.1.2:8080"
  [backends.web_servers.servers.two]
  addr = "198.18.2.2:8080"

[backends.api_servers]
  [backends.api_servers.servers.one]
  addr = "198.18.1.2:8080"     # the same server as web_servers.one: one return rule pair
  [backends.api_servers.servers.three]
  addr = "198.18.3.2:9000"

[backends.unused]
  [backends.unused.servers.x]
  addr = "198.18.9.9:1"

[passthrough]
port_range = "40000-50000"
queue_num = 7

[dsr]
queue_num = 3
"""

CT = "-j CT --notrack"
Q7 = "-j NFQUEUE --queue-num 7 --queue-bypass"


OUTPUT = "CONVEY-OUTPUT"


def chain_lines(text: str, chain: str = rules.CHAIN) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_passthrough_render_holds_the_frontend_and_return_rules() -> None:
    config = parse_config(PASSTHROUGH, "pt.toml")
    text = rules.render(config, "passthrough")
    web = '-d 198.18.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment "convey frontend web"'
    api = '-d 198.18.0.1/32 -p tcp -m tcp --dport 8443 -m comment --comment "convey frontend api"'
    local = "-m addrtype --dst-type LOCAL"
    one = f"-s 198.18.1.2/32 -p tcp -m tcp --sport 8080 --dport 40000:50000 {local}"
    two = f"-s 198.18.2.2/32 -p tcp -m tcp --sport 8080 --dport 40000:50000 {local}"
    three = f"-s 198.18.3.2/32 -p tcp -m tcp --sport 9000 --dport 40000:50000 {local}"
    expected = [
        f"{web} {CT}",
        f"{web} {Q7}",
        f"{api} {CT}",
        f"{api} {Q7}",
        f'{one} -m comment --comment "convey server web_servers/one" {CT}',
        f'{one} -m comment --comment "convey server web_servers/one" {Q7}',
        f'{two} -m comment --comment "convey server web_servers/two" {CT}',
        f'{two} -m comment --comment "convey server web_servers/two" {Q7}',
        f'{three} -m comment --comment "convey server api_servers/three" {CT}',
        f'{three} -m comment --comment "convey server api_servers/three" {Q7}',
        *icmp_rules("! -i lo"),
    ]
    assert chain_lines(text) == [f"-A {rules.CHAIN} {rule}" for rule in expected]
    assert chain_lines(text, OUTPUT) == [f"-A {OUTPUT} {rule}" for rule in icmp_rules("-o lo")]
    assert "198.18.9.9" not in text  # a backend no frontend uses gets no rules


def icmp_rules(iface: str, dests: tuple[str, ...] = ("198.18.0.1",), local: bool = True) -> list[str]:
    """Passthrough's ICMP error rules: per VIP (and source address), then any local address without
    ``source_addrs``; types 3 (with fragmentation needed), 11 and 12; no CT --notrack."""
    found = []
    for dest in (*dests, *(["the balancer"] if local else [])):
        match = f"-d {dest}/32 {iface}" if dest != "the balancer" else iface
        for kind in (3, 11, 12):
            extra = " -m addrtype --dst-type LOCAL" if dest == "the balancer" else ""
            comment = f'-m comment --comment "convey icmp errors to {dest}"'
            found.append(f"{match} -p icmp -m icmp --icmp-type {kind}{extra} {comment} {Q7}")
    return found


def test_icmp_errors_follow_the_source_addrs() -> None:
    text = PASSTHROUGH.replace(
        "queue_num = 7\n", 'queue_num = 7\nsource_addrs = ["198.18.1.1", "198.18.0.1"]\n', 1
    )
    rendered = rules.render(parse_config(text), "passthrough")
    icmp = [line for line in chain_lines(rendered) if "-p icmp" in line]
    assert icmp == [
        f"-A {rules.CHAIN} {r}" for r in icmp_rules("! -i lo", ("198.18.0.1", "198.18.1.1"), False)
    ]
    assert chain_lines(rendered, OUTPUT) == [
        f"-A {OUTPUT} {r}" for r in icmp_rules("-o lo", ("198.18.0.1", "198.18.1.1"), False)
    ]


def test_render_touches_only_our_chain_and_one_jump() -> None:
    text = rules.render(parse_config(PASSTHROUGH), "passthrough")
    lines = text.splitlines()
    assert lines[0] == "*raw"
    assert lines[1] == f":{rules.CHAIN} - [0:0]"
    assert lines[2] == f":{OUTPUT} - [0:0]"  # passthrough: the balancer's own ICMP errors
    assert lines[-1] == "COMMIT"
    other = [line for line in lines[3:-1] if not line.startswith((f"-A {rules.CHAIN} ", f"-A {OUTPUT} "))]
    assert other == [
        f"-I PREROUTING 1 -m comment --comment convey -j {rules.CHAIN}",
        f"-I OUTPUT 1 -m comment --comment convey -j {OUTPUT}",
    ]
    assert text.endswith("COMMIT\n")
    dsr = rules.render(parse_config(PASSTHROUGH), "dsr")
    assert OUTPUT not in dsr and "icmp" not in dsr


def test_ct_notrack_comes_before_the_queue_for_every_match() -> None:
    lines = chain_lines(rules.render(parse_config(PASSTHROUGH), "passthrough"))
    icmp = [line for line in lines if "-p icmp" in line]  # queued as conntrack sees them (ruleset's doc)
    assert icmp and all(line.endswith(Q7) for line in icmp)
    lines = [line for line in lines if line not in icmp]
    for notrack, queue in zip(lines[::2], lines[1::2], strict=True):
        assert notrack.endswith(CT)
        assert queue.endswith(Q7)
        assert notrack.removesuffix(CT) == queue.removesuffix(Q7)


def test_source_addrs_restrict_the_return_path_per_address() -> None:
    text = PASSTHROUGH.replace(
        "queue_num = 7\n", 'queue_num = 7\nsource_addrs = ["198.18.1.1", "198.18.1.3"]\n', 1
    )
    lines = chain_lines(rules.render(parse_config(text), "passthrough"))
    returns = [line for line in lines if "-s 198.18.1.2/32" in line]
    assert len(returns) == 4  # (CT, NFQUEUE) x two source addresses
    assert [line.split()[4:6] for line in returns] == [["-d", "198.18.1.1/32"]] * 2 + [
        ["-d", "198.18.1.3/32"]
    ] * 2
    assert not any("addrtype" in line for line in returns)


def test_dsr_render_queues_only_the_frontends() -> None:
    lines = chain_lines(rules.render(parse_config(PASSTHROUGH), "dsr"))
    assert len(lines) == 4
    assert all("-s " not in line for line in lines)
    # no --queue-bypass in DSR: while convey restarts, packets wait for TCP retransmission, not a local RST
    assert all(line.endswith((CT, "-j NFQUEUE --queue-num 3")) for line in lines)


@pytest.mark.parametrize("mode", rules.MODES)
def test_a_vip_of_0000_is_rejected(mode: str) -> None:
    text = PASSTHROUGH.replace('listen_addr = "198.18.0.1:8443"', 'listen_addr = "0.0.0.0:8443"')
    config = parse_config(text, "any.toml")
    with pytest.raises(ConfigError) as info:
        rules.render(config, mode)
    assert info.value.key == "frontends.api.listen_addr"
    assert info.value.file == "any.toml"
    assert "specific address" in str(info.value)
    with pytest.raises(ConfigError):
        rules.show(config, mode)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        rules.render(parse_config(PASSTHROUGH), "proxy")


def test_comments_are_sanitised() -> None:
    text = PASSTHROUGH.replace("[frontends.web]", '[frontends."we\\"b $(x)"]')
    lines = chain_lines(rules.render(parse_config(text), "dsr"))
    assert '--comment "convey frontend we_b __x_"' in lines[0]


def test_server_marks_one_per_address() -> None:
    config = parse_config(PASSTHROUGH + "fwmark_base = 0x200\nroute_table_base = 1000\n")
    assert rules.server_marks(config) == {
        ("web_servers", "one"): 0x200,
        ("web_servers", "two"): 0x201,
        ("api_servers", "one"): 0x200,  # same address as web_servers.one
        ("api_servers", "three"): 0x202,
        ("unused", "x"): 0x203,
    }


def test_route_tables_must_avoid_the_kernels() -> None:
    config = parse_config(PASSTHROUGH + 'rewrite = "mac"\nroute_table_base = 252\n', "t.toml")
    with pytest.raises(ConfigError) as info:
        rules.server_marks(config)
    assert info.value.key == "dsr.route_table_base"


def test_show_is_restore_input_with_the_extra_settings_as_comments() -> None:
    config = parse_config(PASSTHROUGH + 'rewrite = "mac"\n', "x.toml")
    text = rules.show(config, "dsr")
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert "\n".join(body) + "\n" == rules.render(config, "dsr")
    assert "net.ipv4.conf.all.send_redirects = 0" in text
    assert "ip rule add pref 100 fwmark 0x101 lookup 101" in text
    assert "ip route add default via 198.18.3.2 table 102" in text
    passthrough = rules.show(config, "passthrough")
    assert "net.ipv4.ip_local_reserved_ports = (existing list)+40000-50000" in passthrough
    assert "ip rule" not in passthrough


@pytest.mark.parametrize("mode", rules.MODES)
def test_the_checked_in_rule_files_match_the_samples(mode: str) -> None:
    config = load_config(ROOT / "samples" / f"sample-{mode}.toml")
    checked_in = (ROOT / "iptables" / f"{mode}.rules").read_text()
    assert chain_lines(checked_in) == chain_lines(rules.render(config, mode)), "regenerate: convey rules show"
    assert chain_lines(checked_in)


@pytest.mark.parametrize(
    ("value", "lo", "hi", "covered", "merged"),
    [
        ("", 40000, 50000, False, "40000-50000"),
        ("40000-50000", 40000, 50000, True, "40000-50000"),
        ("8080,39000-45000", 40000, 50000, False, "8080,39000-45000,40000-50000"),
        ("39000-45000,45001-60000", 40000, 50000, True, "39000-45000,45001-60000"),
        ("40000-49999", 40000, 50000, False, "40000-49999,40000-50000"),
        ("40000", 40000, 40000, True, "40000"),
    ],
)
def test_reserved_ports(value: str, lo: int, hi: int, covered: bool, merged: str) -> None:
    assert sysctls.covers(value, lo, hi) is covered
    assert sysctls.with_reserved(value, lo, hi) == merged


def test_wanted_sysctls_start_from_the_values_before_convey() -> None:
    config = parse_config(PASSTHROUGH)
    now = {
        "net.ipv4.conf.all.rp_filter": "2",  # convey set it earlier: the original (1) decides
        "net.ipv4.conf.s0.rp_filter": "1",
        "net.ipv4.conf.c0.rp_filter": "0",
        "net.ipv4.ip_local_reserved_ports": "8080,40000-50000",
    }
    originals = {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.ip_local_reserved_ports": "8080"}
    wanted = sysctls.wanted(config, Mode.PASSTHROUGH, ["c0", "s0"], originals, now.__getitem__)
    assert wanted == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.accept_local": "1",
        "net.ipv4.conf.c0.accept_local": "1",
        "net.ipv4.conf.s0.accept_local": "1",
        "net.ipv4.conf.all.rp_filter": "2",
        "net.ipv4.conf.s0.rp_filter": "2",
        "net.ipv4.ip_local_reserved_ports": "8080,40000-50000",
    }
    assert sysctls.wanted(config, Mode.DSR, ["eth0.100"], {}, now.__getitem__) == {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.send_redirects": "0",
        "net/ipv4/conf/eth0.100/send_redirects": "0",
    }
