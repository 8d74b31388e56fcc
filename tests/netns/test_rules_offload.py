"""The flow offload rule sets (convey.dataplane.rules with ``offload = true``) against a real kernel, inside the
test bed's namespaces: installed, shown, re-installed after a reload with a mark plan, removed exactly.

Each call runs in a child process in the balancer's namespace (as tests/netns/test_rules.py does).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from convey.config import load_config
from convey.dataplane.rules import offload
from testbed.bed import Testbed
from testbed.host import Host
from testbed.httpd_proc import start_httpd
from tests.netns.test_rules import RUNNER_NS, baseline_rules, saved

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    mine = os.stat("/proc/self/ns/net")
    if f"{mine.st_dev}:{mine.st_ino}" == sys.argv[1]:
        sys.exit("refusing to run: this is the test runner's own network namespace")
    from convey.config import load_config
    from convey.dataplane import rules
    action, mode, path, previous, keep = sys.argv[2:7]
    config = load_config(path) if path != "-" else None
    plan = None
    if previous != "-":
        plan = rules.offload_plan(config, mode, rules.offload_plan(load_config(previous), mode), json.loads(keep))
    try:
        if action == "install":
            result = rules.install(config, mode, plan=plan)
        elif action == "remove":
            result = rules.remove(config)
        elif action == "problems":
            result = rules.problems(config, mode, plan=plan)
        elif action == "show":
            result = rules.show(config, mode, plan=plan)
        else:
            sys.exit(f"unknown action {action}")
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(3)
    print(json.dumps(result))
    """
)

CONNTRACK = [
    "net.netfilter.nf_conntrack_acct",
    "net.netfilter.nf_conntrack_events",
    "net.netfilter.nf_conntrack_tcp_loose",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
]
OTHER = [
    "net.ipv4.ip_forward",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.conf.all.accept_local",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.all.send_redirects",
]


def call(
    host: Host,
    action: str,
    config: Path | None,
    mode: str,
    previous: Path | None = None,
    keep: tuple[str, ...] = (),
) -> Any:
    argv = [RUNNER_NS, action, mode, str(config or "-"), str(previous or "-"), json.dumps(list(keep))]
    proc = host.python(["-c", DRIVER, *argv], check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def write(bed: Testbed, mode: str, name: str, extra: str = "", **kwargs: Any) -> Path:
    section = "[passthrough]" if mode == "passthrough" else "[dsr]"
    text = bed.config_toml(mode, **kwargs)
    text = text.replace("[dsr]\n", "[dsr]\noffload = true\n") if section in text else text + f"\n{section}\n"
    if mode == "passthrough":
        text += "offload = true\n"
    path = bed.logdir / name
    path.write_text(text + extra)
    return path


def nft_tables(host: Host) -> list[str]:
    """The nftables tables of the namespace (iptables-save does not show nft-native ones)."""
    return [line for line in host.run(["nft", "list", "tables"]).stdout.splitlines() if line.strip()]


def sysctls(host: Host) -> dict[str, str]:
    return {key: host.read_sysctl(key) for key in CONNTRACK + OTHER}


def ours(host: Host) -> dict[tuple[str, str], list[str]]:
    """Our chains' rules per (table, chain) and the jumps, as iptables-save shows them."""
    found: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in saved(host):
        if line.startswith("*"):
            table = line[1:]
        for key in offload.HOOKS:
            if key[0] == table and (line.startswith(f"-A {key[1]} ") or line == offload.jump_rule(key)):
                found.setdefault(key, []).append(line)
    return found


def expected(
    config: Path, mode: str, plan: offload.OffloadPlan | None = None
) -> dict[tuple[str, str], list[str]]:
    wanted = offload.chains(load_config(config), mode, plan)
    return {key: [offload.jump_rule(key), *rules] for key, rules in wanted.items()}


def sort(found: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    """Jumps first (iptables-save prints the built-in chains' rules before ours within a table)."""
    return {
        key: sorted(lines, key=lambda line: not line.startswith(("-A PREROUTING", "-A POSTROUTING")))
        for key, lines in found.items()
    }


@pytest.mark.parametrize(
    ("mode", "bed_kind"),
    [("passthrough", "routed"), ("dsr", "routed"), ("dsr", "l2")],
    ids=["passthrough", "dsr-ip", "dsr-mac"],
)
def test_offload_install_reload_remove_leaves_the_namespace_as_before(
    mode: str, bed_kind: str, request: pytest.FixtureRequest
) -> None:
    # one scenario, each step building on the last: install, check, re-install, reload with a plan, remove
    bed: Testbed = request.getfixturevalue(f"{bed_kind}_bed")
    lb = bed.lb
    baseline_rules(lb)
    lb.sysctl("net.ipv4.conf.all.rp_filter", 1)
    before, before_sysctls = saved(lb), sysctls(lb)
    routes_before = (
        lb.run(["ip", "-d", "-4", "rule", "show"]).stdout
        + lb.run(["ip", "-4", "route", "show", "table", "all"]).stdout
    )
    config = write(bed, mode, "offload.toml")
    assert call(lb, "problems", config, mode)
    lines = call(lb, "install", config, mode)
    tables = ["mangle", "nat"] if mode == "passthrough" else ["raw", "mangle", "nat"]
    for table in tables:
        assert f"iptables: created {table} chain CONVEY-PREROUTING with" in "\n".join(lines)
    assert sort(ours(lb)) == expected(config, mode)
    for line in saved(lb):  # every jump of ours is the first rule of its built-in chain
        if line.startswith(("-A PREROUTING", "-A POSTROUTING")):
            assert "convey" in line
            break
    # passthrough: the byte counters, an nft table of convey's own; DSR has none
    assert ("table ip convey_bytes" in nft_tables(lb)) is (mode == "passthrough")
    assert lb.read_sysctl("net.netfilter.nf_conntrack_acct") == "1"
    assert lb.read_sysctl("net.netfilter.nf_conntrack_events") == "1"
    assert lb.read_sysctl("net.netfilter.nf_conntrack_tcp_loose") == "1"
    if mode == "passthrough":
        assert (
            lb.read_sysctl("net.ipv4.conf.all.accept_local")
            == before_sysctls["net.ipv4.conf.all.accept_local"]
        )
        assert lb.read_sysctl("net.ipv4.conf.all.rp_filter") == "1"  # strict stays: not needed with offload
        assert lb.read_sysctl("net.ipv4.ip_local_reserved_ports") == "33768-61000"
    else:
        assert lb.read_sysctl("net.netfilter.nf_conntrack_tcp_timeout_established") == "300"
    assert call(lb, "problems", config, mode) == []
    again = [line for line in call(lb, "install", config, mode) if line.startswith("iptables")]
    assert all(line.endswith("unchanged") for line in again) and len(again) == len(expected(config, mode))
    shown = call(lb, "show", config, mode)
    assert "flow offload" in shown
    assert ("#   table ip convey_bytes {" in shown) is (mode == "passthrough")

    # reload: server s1 removed (still draining, kept), a new server added; s0 keeps its mark
    new_host = "198.19.0.77" if bed_kind == "l2" else "198.18.1.77"
    moved = write(bed, mode, "reload.toml")
    text = moved.read_text().replace(
        "[backends.web_servers.servers.s1]", "[backends.web_servers.servers.new]"
    )
    text = text.replace(f'addr = "{bed.servers[1].addr}:8080"', f'addr = "{new_host}:8080"')
    moved.write_text(text)
    old_plan = offload.offload_plan(load_config(config), mode)
    plan = offload.offload_plan(load_config(moved), mode, old_plan, keep=["web_servers/s1"])
    assert plan.servers["web_servers/s0"] == old_plan.servers["web_servers/s0"]
    assert plan.servers["web_servers/s1"] == old_plan.servers["web_servers/s1"]
    assert plan.servers["web_servers/new"] not in old_plan.servers.values()
    reloaded = call(lb, "install", moved, mode, previous=config, keep=("web_servers/s1",))
    nat_replaced = any(line.startswith("iptables: replaced nat chain CONVEY-PREROUTING") for line in reloaded)
    assert nat_replaced is (bed_kind != "l2")  # mac: no DNAT rules, the routing follows the servers
    if mode == "dsr":
        assert "iptables: raw chain CONVEY-PREROUTING already installed (1 rules), unchanged" in reloaded
        assert "iptables: mangle chain CONVEY-PREROUTING already installed (2 rules), unchanged" in reloaded
    assert sort(ours(lb)) == expected(moved, mode, plan)
    assert call(lb, "problems", moved, mode, previous=config, keep=("web_servers/s1",)) == []
    if bed_kind == "l2":  # the policy routing follows the plan's marks
        rules_now = lb.run(["ip", "-4", "rule", "show"]).stdout
        assert f"fwmark {plan.servers['web_servers/s0']:#x}" in rules_now
        assert f"fwmark {plan.servers['web_servers/new']:#x}" in rules_now

    removed = call(lb, "remove", moved, mode)
    assert any("deleted nat chain CONVEY-PREROUTING" in line for line in removed)
    assert saved(lb) == before
    assert sysctls(lb) == before_sysctls
    assert "table ip convey_bytes" not in nft_tables(lb)  # (iptables-nft leaves its own tables, empty)
    assert (
        lb.run(["ip", "-d", "-4", "rule", "show"]).stdout
        + lb.run(["ip", "-4", "route", "show", "table", "all"]).stdout
        == routes_before
    )
    assert not Path(f"/run/convey/{lb.ns}.json").exists()
    assert call(lb, "remove", moved, mode) == []


def test_switching_between_per_packet_and_offload_replaces_the_rule_set(routed_bed: Testbed) -> None:
    lb = routed_bed.lb
    before, before_sysctls = saved(lb), sysctls(lb)
    per_packet = routed_bed.logdir / "pp.toml"
    per_packet.write_text(routed_bed.config_toml("passthrough"))
    call(lb, "install", per_packet, "passthrough")
    assert lb.read_sysctl("net.ipv4.conf.all.accept_local") == "1"
    config = write(routed_bed, "passthrough", "offload.toml")
    lines = call(lb, "install", config, "passthrough")
    # the raw chain holds offload's event masks now instead of per packet's notrack rules
    assert any(
        line.startswith("iptables: replaced raw chain CONVEY-PREROUTING with 1 rules")
        and "was 12 rules" in line
        for line in lines
    ), lines
    assert "iptables: deleted raw chain CONVEY-OUTPUT (6 rules)" in lines  # per packet's own ICMP errors
    assert "sysctl net.ipv4.conf.all.accept_local: 1 -> 0" in lines
    assert sort(ours(lb)) == expected(config, "passthrough")
    assert "added nft table ip convey_bytes (offload byte counters)" in lines
    assert call(lb, "problems", per_packet, "passthrough")  # the per-packet set is not in place any more
    lines = call(lb, "install", per_packet, "passthrough")
    assert "iptables: deleted nat chain CONVEY-POSTROUTING (1 rules)" in lines
    assert "removed nft table ip convey_bytes" in lines  # per packet counts bytes itself
    assert call(lb, "problems", per_packet, "passthrough") == []
    call(lb, "remove", None, "passthrough")
    assert saved(lb) == before
    assert sysctls(lb) == before_sysctls


def test_passthrough_offload_rules_carry_a_connection_through_a_reload(routed_bed: Testbed) -> None:
    """The kernel half of passthrough offload, with a MARK rule standing in for convey's verdict: the first
    packet's mark picks server 0, conntrack NATs the rest both ways; a reload (the nat chains re-rendered in one
    transaction) in the middle of a download cuts nothing."""
    # one scenario: connect, reload during a download, connect again through the new SNAT rule
    bed = routed_bed
    lb = bed.lb
    config = write(bed, "passthrough", "offload.toml")
    call(lb, "install", config, "passthrough")
    plan = offload.offload_plan(load_config(config), "passthrough")
    mark = plan.mark("web_servers/s0")
    verdict = ["PREROUTING", "-d", f"{bed.vip}/32", "-p", "tcp", "--dport", "80", "-m", "conntrack"]
    verdict += ["--ctstate", "NEW", "-j", "MARK", "--set-xmark", f"{mark:#x}/{plan.mask:#x}"]
    lb.run(["iptables", "-t", "mangle", "-I", *verdict[:1], "1", *verdict[1:]])
    start_httpd(bed.servers[0], port=8080)
    start_httpd(bed.servers[1], port=8080)
    url = f"http://{bed.vip}:80"
    body = bed.client.curl(f"{url}/").decode()
    assert body.startswith("server0 ")
    port = int(body.split(":")[1])
    assert 33768 <= port <= 61000  # MASQUERADE into the reserved range
    size = 4_000_000
    download = bed.client.popen(
        [
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "30",
            "--limit-rate",
            "1M",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            f"{url}/bytes/{size}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        moved = write(
            bed, "passthrough", "reload.toml", extra='source_addrs = ["198.18.1.1", "198.18.2.1"]\n'
        )
        lines = call(lb, "install", moved, "passthrough", previous=config)
        assert any("replaced nat chain CONVEY-POSTROUTING" in line for line in lines)
        out, err = download.communicate(timeout=40)
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert download.returncode == 0, err
    assert int(out) == size
    # the verdict now names a source address too (index 0 = 198.18.1.1, the address towards server 0)
    lb.run(["iptables", "-t", "mangle", "-D", *verdict])
    plan = offload.offload_plan(load_config(moved), "passthrough", plan)
    verdict[-1] = f"{plan.mark('web_servers/s0', plan.source_index('198.18.1.1')):#x}/{plan.mask:#x}"
    lb.run(["iptables", "-t", "mangle", "-I", *verdict[:1], "1", *verdict[1:]])
    body = bed.client.curl(f"{url}/").decode()
    assert body.startswith("server0 198.18.1.1:")  # the new SNAT rule
    lb.run(["iptables", "-t", "mangle", "-D", *verdict])
    call(lb, "remove", None, "passthrough")
