"""convey.dataplane.rules against a real kernel, inside the test bed's namespaces (never the host's).

Each call runs in a child process started with ``ip netns exec`` (the rules module works on the namespace it
runs in), which refuses to run if it finds itself in the test runner's own namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from convey.config import parse_config
from convey.dataplane import rules
from convey.dataplane.rules import ruleset
from testbed.bed import Testbed
from testbed.host import Host
from testbed.httpd_proc import start_httpd
from testbed.process import read_line

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    mine = os.stat("/proc/self/ns/net")
    if f"{mine.st_dev}:{mine.st_ino}" == sys.argv[1]:
        sys.exit("refusing to run: this is the test runner's own network namespace")
    from convey.config import load_config
    from convey.dataplane import rules
    config = load_config(sys.argv[2]) if sys.argv[2] != "-" else None
    action, mode = sys.argv[3], sys.argv[4]
    try:
        if action == "install":
            result = rules.install(config, mode)
        elif action == "remove":
            result = rules.remove(config)
        elif action == "problems":
            result = rules.problems(config, mode)
        elif action == "present":
            result = rules.present(config, mode)
        else:
            sys.exit(f"unknown action {action}")
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(3)
    print(json.dumps(result))
    """
)

_me = os.stat("/proc/self/ns/net")
RUNNER_NS = f"{_me.st_dev}:{_me.st_ino}"


class Failed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def call(host: Host, action: str, config: Path | None, mode: str = "passthrough") -> Any:
    proc = host.python(["-c", DRIVER, RUNNER_NS, str(config or "-"), action, mode], check=False, timeout=60)
    if proc.returncode == 3:
        error = json.loads(proc.stdout)
        raise Failed(error["error"], error["message"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_config(bed: Testbed, mode: str, name: str = "convey.toml", **kwargs: Any) -> Path:
    path = bed.logdir / name
    path.write_text(bed.config_toml(mode, **kwargs))
    return path


def saved(host: Host) -> list[str]:
    """``iptables-save`` normalised: no comments or counters, and no table that holds nothing but empty
    built-in chains with policy ACCEPT (iptables-nft shows such a table once anything touched it; it equals
    no table)."""
    tables: list[list[str]] = []
    for line in host.run(["iptables-save"]).stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        tables[-1].append(re.sub(r" \[\d+:\d+\]$", "", line))
    kept = []
    for table in tables:
        body = table[1:-1]
        if all(re.fullmatch(r":[A-Z]+ ACCEPT", line) for line in body):
            continue
        kept += table
    return kept


def counters(host: Host) -> dict[str, int]:
    """Packets matched by each rule of our chain, keyed by the rule."""
    result = {}
    for line in host.run(["iptables-save", "-c", "-t", "raw"]).stdout.splitlines():
        match = re.fullmatch(rf"\[(\d+):\d+\] (-A {rules.CHAIN} .*)", line)
        if match:
            result[match.group(2)] = int(match.group(1))
    return result


def baseline_rules(host: Host) -> None:
    """Rules that are not ours, which install and remove must leave alone."""
    host.run(
        ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "CT", "--notrack"]
    )
    host.run(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    host.run(["iptables", "-t", "raw", "-N", "SOMEONE-ELSE"])


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-other-rules"])
@pytest.mark.parametrize("mode", rules.MODES)
def test_install_then_remove_leaves_iptables_as_before(
    routed_bed: Testbed, mode: str, existing: bool
) -> None:
    lb = routed_bed.lb
    config = write_config(routed_bed, mode)
    if existing:
        baseline_rules(lb)
    before = saved(lb)
    assert call(lb, "present", config, mode) is False
    lines = call(lb, "install", config, mode)
    assert any("created raw chain CONVEY-PREROUTING" in line for line in lines)
    after = saved(lb)
    ours = [line for line in after if rules.CHAIN in line]
    expected_rules = rules.chain_rules(parse_config(config.read_text()), mode)
    assert ours == [f":{rules.CHAIN} -", rules.JUMP_RULE, *expected_rules]
    prerouting = [line for line in after if line.startswith("-A PREROUTING ")]
    assert prerouting[0] == rules.JUMP_RULE  # first: nothing before it can divert our packets
    # passthrough: the balancer's own ICMP errors, queued in raw OUTPUT (ruleset.OUTPUT_CHAIN)
    output = ruleset.output_rules(parse_config(config.read_text()), mode)
    output_jump = f"-A OUTPUT -m comment --comment convey -j {ruleset.OUTPUT_CHAIN}"
    expected_output = [f":{ruleset.OUTPUT_CHAIN} -", output_jump, *output] if output else []
    assert [line for line in after if ruleset.OUTPUT_CHAIN in line] == expected_output
    assert (mode == "passthrough") == bool(output)
    others = [line for line in before if line.startswith("-A ")]
    assert [line for line in after if line.startswith("-A ") and "CONVEY-" not in line] == others
    assert call(lb, "present", config, mode) is True
    removed = call(lb, "remove", config)
    assert any("deleted raw chain" in line for line in removed)
    assert saved(lb) == before
    assert call(lb, "present", config, mode) is False
    assert call(lb, "remove", config) == []  # nothing left to remove: fine


def test_install_twice_is_idempotent_and_a_new_mode_replaces_the_old(routed_bed: Testbed) -> None:
    lb = routed_bed.lb
    baseline_rules(lb)
    before = saved(lb)
    passthrough = write_config(routed_bed, "passthrough")
    call(lb, "install", passthrough, "passthrough")
    first = saved(lb)
    again = call(lb, "install", passthrough, "passthrough")
    assert again == [
        "iptables: raw chain CONVEY-PREROUTING already installed (12 rules), unchanged",
        "iptables: raw chain CONVEY-OUTPUT already installed (6 rules), unchanged",
    ]
    assert saved(lb) == first
    # a duplicated jump (someone loaded the rendered file by hand) is repaired to exactly one
    lb.run(
        ["iptables-restore", "--noflush"],
        input=rules.render(parse_config(passthrough.read_text()), "passthrough"),
    )
    assert sum(line == rules.JUMP_RULE for line in saved(lb)) == 2
    assert call(lb, "present", passthrough, "passthrough") is False
    call(lb, "install", passthrough, "passthrough")
    assert saved(lb) == first
    # dsr replaces passthrough: one chain, one jump, the dsr rules only, the reserved ports given back
    dsr = write_config(routed_bed, "dsr", name="dsr.toml")
    lines = call(lb, "install", dsr, "dsr")
    assert 'sysctl net.ipv4.ip_local_reserved_ports: 33768-61000 -> ""' in lines
    ours = [line for line in saved(lb) if rules.CHAIN in line]
    assert ours == [
        f":{rules.CHAIN} -",
        rules.JUMP_RULE,
        *rules.chain_rules(parse_config(dsr.read_text()), "dsr"),
    ]
    assert call(lb, "present", dsr, "dsr") is True
    assert call(lb, "present", passthrough, "passthrough") is False
    call(lb, "remove", None)
    assert saved(lb) == before


def test_present_notices_a_missing_piece(routed_bed: Testbed) -> None:
    lb = routed_bed.lb
    config = write_config(routed_bed, "passthrough")
    call(lb, "install", config, "passthrough")
    lb.run(
        [
            "iptables",
            "-t",
            "raw",
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "convey",
            "-j",
            rules.CHAIN,
        ]
    )
    assert call(lb, "problems", config, "passthrough") == [
        "expected one jump from raw PREROUTING to CONVEY-PREROUTING, found 0"
    ]
    call(lb, "install", config, "passthrough")
    lb.sysctl("net.ipv4.ip_forward", 0)
    assert call(lb, "problems", config, "passthrough") == ["sysctl net.ipv4.ip_forward is not 1"]
    call(lb, "remove", config)


def test_sysctls_are_set_reported_and_restored(routed_bed: Testbed) -> None:
    lb = routed_bed.lb
    lb.sysctl("net.ipv4.ip_forward", 0)
    lb.sysctl("net.ipv4.ip_local_reserved_ports", "8080")
    keys = ["net.ipv4.ip_forward", "net.ipv4.ip_local_reserved_ports"]
    keys += [f"net.ipv4.conf.{iface}.accept_local" for iface in ("all", "c0", "s0", "s1")]
    before = {key: lb.read_sysctl(key) for key in keys}
    assert before["net.ipv4.conf.all.accept_local"] == "0"
    config = write_config(routed_bed, "passthrough")
    lines = call(lb, "install", config, "passthrough")
    for line in [
        "sysctl net.ipv4.ip_forward: 0 -> 1",
        "sysctl net.ipv4.conf.all.accept_local: 0 -> 1",
        "sysctl net.ipv4.conf.c0.accept_local: 0 -> 1",  # holds the VIP
        "sysctl net.ipv4.conf.s0.accept_local: 0 -> 1",  # towards server 0
        "sysctl net.ipv4.conf.s1.accept_local: 0 -> 1",
        "sysctl net.ipv4.ip_local_reserved_ports: 8080 -> 8080,33768-61000",
    ]:
        assert line in lines
    assert all(lb.read_sysctl(key) == "1" for key in keys if key.endswith(("accept_local", "ip_forward")))
    # a value someone changes after install is theirs: remove leaves it and says so
    lb.sysctl("net.ipv4.conf.s1.accept_local", 0)
    lb.sysctl("net.ipv4.conf.s1.accept_local", 1)  # same value: still ours
    lb.sysctl("net.ipv4.conf.s0.accept_local", 0)
    lb.sysctl("net.ipv4.conf.s0.accept_local", 1)
    lb.sysctl("net.ipv4.conf.c0.accept_local", 0)
    removed = call(lb, "remove", config)
    assert "sysctl net.ipv4.conf.c0.accept_local: left at 0 (convey had set 1; changed since)" in removed
    assert {key: lb.read_sysctl(key) for key in keys} == before
    assert not Path(f"/run/convey/{lb.ns}.json").exists()


def test_dsr_sysctls(l2_bed: Testbed) -> None:
    lb = l2_bed.lb
    config = write_config(l2_bed, "dsr")
    before = {
        k: lb.read_sysctl(k)
        for k in ("net.ipv4.conf.all.send_redirects", "net.ipv4.conf.eth0.send_redirects")
    }
    call(lb, "install", config, "dsr")
    assert lb.read_sysctl("net.ipv4.conf.all.send_redirects") == "0"
    assert lb.read_sysctl("net.ipv4.conf.eth0.send_redirects") == "0"
    call(lb, "remove", config)
    assert {k: lb.read_sysctl(k) for k in before} == before


def test_rules_pass_traffic_when_convey_is_not_running(routed_bed: Testbed) -> None:
    """--queue-bypass: with nobody on the queue, the kernel accepts; the return-path rules see only replies to
    the ephemeral range, so the balancer's own connections (outside the reserved range) do not match."""
    bed = routed_bed
    lb = bed.lb
    config = write_config(bed, "passthrough", port=80, server_port=8080)
    call(lb, "install", config, "passthrough")
    local_web = start_httpd(lb, port=80, name="lb", bind=bed.vip)
    server_web = start_httpd(bed.servers[0], port=8080)
    assert bed.client.curl(local_web.url("/")).decode().startswith("lb 198.18.0.2:")
    hits = counters(lb)
    frontend = [n for rule, n in hits.items() if "--dport 80 " in rule]
    assert frontend[0] > 0 and frontend[0] == frontend[1]  # CT and NFQUEUE saw the same packets
    # the balancer's own connection to a server: kernel-chosen port, outside the reserved range, not ours
    before = sum(counters(lb).values())
    body = lb.curl(server_web.url("/")).decode()
    port = int(body.split(":")[1])
    assert not 33768 <= port <= 61000
    assert sum(counters(lb).values()) == before
    # a connection from a port in the range (as convey's rewritten flows use): replies hit the return rules
    with lb.socket() as sock:
        sock.settimeout(10)
        sock.bind((bed.lb_addr_towards(0), 40000))
        sock.connect((bed.servers[0].addr, 8080))
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.endswith(b"server0 198.18.1.1:40000\n")
    returns = [n for rule, n in counters(lb).items() if "-s 198.18.1.2/32" in rule]
    assert returns[0] > 0 and returns[0] == returns[1]
    call(lb, "remove", config)


def test_dsr_mac_policy_routing_installed_and_removed_exactly(l2_bed: Testbed) -> None:
    lb = l2_bed.lb
    rules_before = lb.run(["ip", "-d", "-4", "rule", "show"]).stdout
    routes_before = lb.run(["ip", "-d", "-4", "route", "show", "table", "all"]).stdout
    config = write_config(l2_bed, "dsr")
    assert 'rewrite = "mac"' in config.read_text()
    lines = call(lb, "install", config, "dsr")
    assert "ip rule: moved `from all lookup local` from pref 0 to pref 101" in lines
    shown = lb.run(["ip", "-d", "-4", "rule", "show"]).stdout.splitlines()
    assert shown[:3] == [
        "100:\tfrom all fwmark 0x100 lookup 100 proto static",
        "100:\tfrom all fwmark 0x101 lookup 101 proto static",
        "101:\tfrom all lookup local proto kernel",
    ]
    assert (
        "default via 198.19.0.11 dev eth0 proto static"
        in lb.run(["ip", "route", "show", "table", "100"]).stdout
    )
    assert (
        "default via 198.19.0.12 dev eth0 proto static"
        in lb.run(["ip", "route", "show", "table", "101"]).stdout
    )
    assert call(lb, "present", config, "dsr") is True
    assert call(lb, "install", config, "dsr") == [
        "iptables: raw chain CONVEY-PREROUTING already installed (2 rules), unchanged"
    ]
    assert lb.run(["ip", "-d", "-4", "rule", "show"]).stdout.splitlines() == shown
    call(lb, "remove", config)
    assert lb.run(["ip", "-d", "-4", "rule", "show"]).stdout == rules_before
    assert lb.run(["ip", "-d", "-4", "route", "show", "table", "all"]).stdout == routes_before
    assert call(lb, "present", config, "dsr") is False


MARKER = textwrap.dedent(
    """
    # A stand-in for convey's DSR verdict: accept every queued packet with the fwmark given (bounded: 15 s).
    import select, socket, sys, time
    from netfilterqueue import NetfilterQueue
    mark = int(sys.argv[1])
    def handle(packet):
        packet.set_mark(mark)
        packet.accept()
    queue = NetfilterQueue()
    queue.bind(0, handle)
    sock = socket.fromfd(queue.get_fd(), socket.AF_UNIX, socket.SOCK_STREAM)
    print("BOUND", flush=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.1)[0]:
            queue.run(block=False)
    """
)


def test_dsr_mac_marks_carry_vip_traffic_to_the_server(l2_bed: Testbed) -> None:
    """The kernel path of rewrite=mac, with a minimal verdict that only sets the server's mark: the frame goes
    to the marked server's MAC, the destination IP stays the VIP, the server answers the client directly."""
    bed = l2_bed
    lb = bed.lb
    config = write_config(bed, "dsr", port=80, server_port=80)
    for server in bed.servers:
        server.add_vip_on_lo(bed.vip)
        start_httpd(server, port=80, bind="0.0.0.0")
    call(lb, "install", config, "dsr")
    marks = rules.server_marks(parse_config(config.read_text()))
    for i in (1, 0):
        marker = lb.popen(
            [sys.executable, "-c", MARKER, str(marks[("web_servers", f"s{i}")])], stdout=subprocess.PIPE
        )
        try:
            assert read_line(marker, 10) == "BOUND"
            body = bed.client.curl(f"http://{bed.vip}/").decode()
        finally:
            marker.kill()
            marker.wait(5)
        assert body.startswith(f"server{i} {bed.client.addr}:")
    call(lb, "remove", config)


def test_dsr_mac_needs_one_l2_segment(routed_bed: Testbed) -> None:
    """From the client's namespace every server is behind the gateway 198.18.0.1: install refuses, changes
    nothing."""
    client = routed_bed.client
    config = routed_bed.logdir / "mac.toml"
    config.write_text(routed_bed.config_toml("dsr", extra='[dsr]\nrewrite = "mac"\n'))
    before = saved(client), client.run(["ip", "-d", "rule"]).stdout
    with pytest.raises(Failed) as info:
        call(client, "install", config, "dsr")
    assert info.value.kind == "ConfigError"
    assert "backends.web_servers.servers.s0.addr" in info.value.message
    assert "one L2 segment" in info.value.message
    assert "via the gateway 198.18.0.1" in info.value.message
    assert (saved(client), client.run(["ip", "-d", "rule"]).stdout) == before


def test_dsr_mac_refuses_to_reorder_existing_policy_rules(l2_bed: Testbed) -> None:
    lb = l2_bed.lb
    lb.run(["ip", "rule", "add", "pref", "50", "from", "198.19.0.0/24", "lookup", "main"])
    before = lb.run(["ip", "-d", "rule"]).stdout
    config = write_config(l2_bed, "dsr")
    sysctls = lb.run(["sysctl", "net.ipv4"]).stdout
    with pytest.raises(Failed, match="pref 50"):
        call(lb, "install", config, "dsr")
    # refused before changing anything
    assert lb.run(["ip", "-d", "rule"]).stdout == before
    assert lb.run(["sysctl", "net.ipv4"]).stdout == sysctls
    assert not [line for line in saved(lb) if rules.CHAIN in line]


REWRITER = textwrap.dedent(
    """
    # A stand-in for convey's passthrough verdict: rewrite client -> VIP:80 into LB:40000 -> server:8080 and
    # count what comes back from the server (the SYN-ACK, queued by the return-path rule). Bounded: 5 s.
    import select, socket, sys, time
    from netfilterqueue import NetfilterQueue
    from scapy.layers.inet import IP, TCP
    vip, lb, server = sys.argv[1:4]
    seen = {"forward": 0, "return": 0}
    def handle(packet):
        ip = IP(packet.get_payload())
        if ip.dst == vip:
            seen["forward"] += 1
            ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport = lb, server, 40000, 8080
            del ip.chksum, ip[TCP].chksum
            packet.set_payload(bytes(ip))
            packet.accept()
        else:
            seen["return"] += 1
            packet.drop()
    queue = NetfilterQueue()
    queue.bind(0, handle)
    sock = socket.fromfd(queue.get_fd(), socket.AF_UNIX, socket.SOCK_STREAM)
    print("BOUND", flush=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not seen["return"]:
        if select.select([sock], [], [], 0.1)[0]:
            queue.run(block=False)
    print(seen["forward"], seen["return"], flush=True)
    """
)


@pytest.mark.parametrize(
    ("rp_filter", "undo_accept_local", "returns"),
    [(0, False, True), (1, False, True), (2, False, True), (0, True, False)],
    ids=["rp_filter=0", "rp_filter=1", "rp_filter=2", "without-accept_local"],
)
def test_installed_sysctls_admit_rewritten_packets(
    routed_bed: Testbed, rp_filter: int, undo_accept_local: bool, returns: bool
) -> None:
    """The rewritten packets carry a balancer address as source: the kernel drops them as martians without
    accept_local, and with strict rp_filter even with it; install takes care of both."""
    bed = routed_bed
    lb = bed.lb
    for conf in ("all", "c0", "s0"):
        lb.sysctl(f"net.ipv4.conf.{conf}.rp_filter", rp_filter)
    config = write_config(bed, "passthrough")
    lines = call(lb, "install", config, "passthrough")
    assert ("sysctl net.ipv4.conf.s0.rp_filter: 1 -> 2" in lines) is (rp_filter == 1)
    if undo_accept_local:  # the negative control: what install's accept_local prevents
        for conf in ("all", "c0", "s0", "s1"):
            lb.sysctl(f"net.ipv4.conf.{conf}.accept_local", 0)
    start_httpd(bed.servers[0], port=8080)
    rewriter = lb.popen(
        [sys.executable, "-c", REWRITER, bed.vip, bed.lb_addr_towards(0), bed.servers[0].addr],
        stdout=subprocess.PIPE,
    )
    assert read_line(rewriter, 10) == "BOUND"
    bed.client.run(["curl", "-s", "--max-time", "2", f"http://{bed.vip}/"], check=False, timeout=10)
    forward, back = map(int, read_line(rewriter, 10).split())
    assert forward >= 1
    assert (back >= 1) is returns
    call(lb, "remove", config)
    assert lb.read_sysctl("net.ipv4.conf.s0.rp_filter") == str(rp_filter)


def test_cli_failures_are_one_line_and_change_nothing(routed_bed: Testbed) -> None:
    """`convey rules install/remove` as a user who is not root, and without iptables on PATH: exit 2, one line
    saying what failed, no traceback, the namespace unchanged."""
    lb = routed_bed.lb
    shared = Path(tempfile.mkdtemp(prefix="cvy-rules-"))  # readable by nobody, unlike the bed's log directory
    try:
        shared.chmod(0o755)
        config = shared / "convey.toml"
        config.write_text(routed_bed.config_toml("passthrough"))
        config.chmod(0o644)
        before = saved(lb), lb.run(["sysctl", "net.ipv4"]).stdout
        convey = [sys.executable, "-m", "convey", "rules"]
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for action in ("install", "remove"):
            proc = lb.run([*nobody, *convey, action, f"--config={config}"], check=False)
            assert proc.returncode == 2, proc
            assert proc.stderr.startswith(f"convey: rules {action} failed: iptables-save -t raw failed: "), (
                proc
            )
            assert "Permission denied (you must be root)" in proc.stderr
            assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
            proc = lb.run(["env", "PATH=/nonexistent", *convey, action, f"--config={config}"], check=False)
            assert proc.returncode == 2, proc
            assert proc.stderr == (
                f"convey: rules {action} failed: iptables-save not found: install iptables (the nft variant, "
                "iptables-nft)\n"
            )
        assert (saved(lb), lb.run(["sysctl", "net.ipv4"]).stdout) == before
        assert not Path(f"/run/convey/{lb.ns}.json").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
