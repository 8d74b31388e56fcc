"""scripts/setup-dsr-backend.sh (convey.backend) in a server's namespace: install, idempotence, remove
restoring exactly what was there, and clear errors.

What runs where: the nftables method end to end here (and through convey in test_dsr.py); the tc method only up to
the kernel refusing the nat action, since this kernel has no act_nat (its netlink bytes are checked against tc's in
tests/unit/test_tc_nat.py). The tc-on-a-kernel-with-act_nat test skips itself here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from convey.backend.egress_tc import tc_support
from convey.backend.prepare import NEEDS_BALANCER
from testbed.bed import Testbed
from testbed.dsr import BACKEND_STATE_DIR, SETUP_SCRIPT, setup_script
from testbed.host import Host

VIP = "198.18.0.1"
LB = "198.18.1.1"  # the balancer's address towards server 0: where the health checks come from
SYSCTLS = [
    f"net.ipv4.conf.{conf}.{key}" for conf in ("all", "eth0") for key in ("arp_ignore", "arp_announce")
]


@pytest.fixture
def server() -> Iterator[Host]:
    """Server 0 of a routed bed (eth0 198.18.1.2/24, default route via the balancer)."""
    bed = Testbed.create(kind="routed", servers=1)
    try:
        yield bed.servers[0]
    finally:
        try:
            for port in ("80", "443", "8443"):
                setup_script(bed.servers[0], "remove", "--vip", VIP, "--port", port, check=False)
        finally:
            (BACKEND_STATE_DIR / f"{bed.servers[0].ns}.json").unlink(missing_ok=True)
            bed.destroy()


def snapshot(host: Host) -> dict[str, str]:
    """Everything the script may touch: nftables, qdiscs and filters, addresses, the ARP sysctls."""
    tc = host.run(["tc", "qdisc", "show"]).stdout + host.run(["tc", "filter", "show", "dev", "eth0"]).stdout
    return {
        "nft": host.run(["nft", "list", "ruleset"]).stdout,
        "tc": tc,
        "addrs": host.run(["ip", "-4", "addr", "show"]).stdout,
        **{key: host.read_sysctl(key) for key in SYSCTLS},
    }


def state_file(host: Host) -> bool:
    return (BACKEND_STATE_DIR / f"{host.ns}.json").exists()


def run(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return setup_script(host, *args, check=False)


def test_nft_egress_nat_install_is_idempotent_and_remove_restores(server: Host) -> None:
    before = snapshot(server)
    first = run(server, "install", "--vip", VIP, "--port", "80", "--server-port", "8080", "--balancer", LB)
    assert first.returncode == 0, first.stderr
    assert "method: nft (auto: the ports differ and tc's nat action cannot restore ports)" in first.stdout
    table = server.run(["nft", "list", "table", "ip", "convey_dsr"]).stdout
    assert "type filter hook postrouting priority srcnat; policy accept;" in table
    assert (
        'oifname "eth0" ip saddr 198.18.1.2 ip daddr != { 198.18.0.1, 198.18.1.1 } tcp sport 8080 '
        "ip saddr set 198.18.0.1 "
        'tcp sport set 80 comment "convey-dsr 198.18.0.1:80"'
    ) in table
    assert state_file(server)

    again = run(server, "install", "--vip", VIP, "--port", "80", "--server-port", "8080", "--balancer", LB)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith("unchanged")
    assert server.run(["nft", "list", "table", "ip", "convey_dsr"]).stdout == table

    # a second VIP port beside the first; same ports: tc would do if the kernel had act_nat
    second = run(
        server, "install", "--vip", VIP, "--port", "443", "--balancer", LB, "--balancer", "198.18.1.9"
    )
    assert second.returncode == 0, second.stderr
    ok, headline, _ = tc_support()
    if ok is False:
        assert f"method: nft (auto: {headline}" in second.stdout
    assert (
        "ip daddr != { 198.18.0.1, 198.18.1.1, 198.18.1.9 } tcp sport 443 ip saddr set 198.18.0.1 comment"
        in second.stdout
    )
    shown = run(server, "show").stdout
    assert "198.18.0.1:80: ip: nft egress NAT on eth0: 198.18.1.2 -> 198.18.0.1, port 8080->80" in shown
    assert "198.18.0.1:443: " in shown

    assert run(server, "remove", "--vip", VIP, "--port", "80").returncode == 0
    table = server.run(["nft", "list", "table", "ip", "convey_dsr"]).stdout
    assert "198.18.0.1:80" not in table and "198.18.0.1:443" in table
    last = run(server, "remove", "--vip", VIP, "--port", "443")
    assert last.returncode == 0, last.stderr
    assert snapshot(server) == before
    assert not state_file(server)
    # remove again: nothing to do, and it says so
    gone = run(server, "remove", "--vip", VIP, "--port", "443")
    assert gone.returncode == 0 and "nothing installed" in gone.stdout


def test_install_puts_back_what_vanished_from_the_kernel(server: Host) -> None:
    args = ["install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "nft"]
    assert run(server, *args).returncode == 0
    server.run(["nft", "delete", "table", "ip", "convey_dsr"])
    again = run(server, *args)
    assert "recorded but missing from the kernel; installing it again" in again.stdout, again
    assert 'comment "convey-dsr 198.18.0.1:80"' in server.run(["nft", "list", "ruleset"]).stdout


def test_mac_install_is_idempotent_and_remove_restores(server: Host) -> None:
    before = snapshot(server)
    first = run(server, "install", "--rewrite", "mac", "--vip", VIP, "--port", "80")
    assert first.returncode == 0, first.stderr
    assert "ip addr add 198.18.0.1/32 dev lo" in first.stdout
    assert {key: server.read_sysctl(key) for key in SYSCTLS} == {
        "net.ipv4.conf.all.arp_ignore": "1",
        "net.ipv4.conf.all.arp_announce": "2",
        "net.ipv4.conf.eth0.arp_ignore": "1",
        "net.ipv4.conf.eth0.arp_announce": "2",
    }
    assert "inet 198.18.0.1/32 scope global lo" in server.run(["ip", "-4", "addr", "show", "lo"]).stdout
    assert (
        run(server, "install", "--rewrite", "mac", "--vip", VIP, "--port", "80")
        .stdout.strip()
        .endswith("unchanged")
    )
    assert run(server, "remove", "--vip", VIP, "--port", "80").returncode == 0
    assert snapshot(server) == before
    assert not state_file(server)


def test_mac_remove_leaves_a_vip_that_was_already_on_lo(server: Host) -> None:
    server.sysctl(
        "net.ipv4.conf.all.arp_ignore", 2
    )  # stricter than needed: install sets 1, remove puts 2 back
    server.add_vip_on_lo(VIP, arp=False)
    before = snapshot(server)
    out = run(server, "install", "--rewrite", "mac", "--vip", VIP, "--port", "80").stdout
    assert "lo already holds 198.18.0.1/32" in out and "arp_ignore: 2 -> 1" in out
    assert run(server, "remove", "--vip", VIP, "--port", "80").returncode == 0
    assert snapshot(server) == before


@pytest.mark.skipif(tc_support()[0] is not False, reason="this kernel may have act_nat")
def test_tc_without_act_nat_fails_clearly_and_leaves_nothing(server: Host) -> None:
    before = snapshot(server)
    proc = run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "tc")
    assert proc.returncode == 1
    assert "act_nat not available: the kernel refused the nat action (ENOENT" in proc.stderr, proc.stderr
    assert "Use --method nft (or auto)" in proc.stderr
    assert snapshot(server) == before  # the htb qdisc it had added is gone again
    assert not state_file(server)
    # auto sees it coming and says why it takes nft
    auto = run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB)
    assert auto.returncode == 0
    assert "method: nft (auto: act_nat not available: CONFIG_NET_ACT_NAT is not set" in auto.stdout


@pytest.mark.skipif(tc_support()[0] is False, reason="act_nat not available in this kernel")
def test_tc_with_act_nat_installs_the_original_recipe(server: Host) -> None:
    before = snapshot(server)
    proc = run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "tc")
    assert proc.returncode == 0, proc.stderr
    filters = server.run(["tc", "filter", "show", "dev", "eth0"]).stdout
    assert "nat" in filters and "egress 198.18.1.2/32 198.18.0.1" in filters
    assert (
        run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "tc")
        .stdout.strip()
        .endswith("unchanged")
    )
    assert run(server, "remove", "--vip", VIP, "--port", "80").returncode == 0
    assert snapshot(server) == before


def test_tc_refuses_a_port_it_cannot_restore_and_a_qdisc_it_does_not_own(server: Host) -> None:
    before = snapshot(server)
    proc = run(server, "install", "--vip", VIP, "--port", "80", "--server-port", "8080", "--method", "tc")
    assert proc.returncode == 1
    assert "tc's nat action rewrites addresses only and cannot restore the port" in proc.stderr
    assert snapshot(server) == before
    server.run(["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb"])
    theirs = snapshot(server)
    proc = run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "tc")
    assert proc.returncode == 1
    assert "eth0 has a root qdisc htb 1: that convey did not add" in proc.stderr
    assert snapshot(server) == theirs


def test_clear_errors(server: Host) -> None:
    missing = run(server, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--dev", "nope0")
    assert missing.returncode == 1
    assert "no interface 'nope0' here (interfaces: eth0, lo)" in missing.stderr
    usage = run(server, "install", "--port", "80")
    assert usage.returncode == 2 and "install needs --vip and --port" in usage.stderr
    bad = run(server, "install", "--vip", "198.18.0.300", "--port", "80")
    assert bad.returncode == 1 and "--vip must be an IPv4 address" in bad.stderr
    helped = run(server, "--help")
    assert helped.returncode == 0 and "--method {auto,tc,nft}" in helped.stdout
    # not root: refused before anything is looked at
    nobody = server.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(SETUP_SCRIPT), "install",
         "--vip", VIP, "--port", "80"],
        check=False,
    )  # fmt: skip
    assert nobody.returncode == 1
    assert "must run as root" in nobody.stderr
    assert not state_file(server)
    # rewrite ip without --balancer: refused, saying what to add (the health checks' replies would be rewritten)
    bare = run(server, "install", "--vip", VIP, "--port", "80", "--rewrite", "ip")
    assert bare.returncode == 2
    assert bare.stderr == f"setup-dsr-backend: {NEEDS_BALANCER}\n"
    assert "--rewrite ip needs --balancer ADDR" in bare.stderr
    # nft missing from PATH: one line, no traceback, nothing left
    before = snapshot(server)
    cli = [sys.executable, "-m", "convey.backend", "install", "--vip", VIP, "--port", "80", "--balancer", LB]
    no_nft = server.run(["env", "PATH=/nonexistent", *cli, "--method", "nft"], check=False)
    assert no_nft.returncode == 1, no_nft.stderr
    assert no_nft.stderr == (
        "setup-dsr-backend: install failed: the nft command is missing: install nftables "
        "(Debian: apt-get install nftables)\n"
    )
    assert snapshot(server) == before
    assert not state_file(server)
