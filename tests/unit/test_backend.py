"""The DSR backend tool (convey.backend) without root: arguments, the nft rule it renders, its record, and its
error messages (one line, never a traceback). The kernel is faked: /proc/sys and the state directory are
temporary directories, pyroute2's IPRoute is a stub, and PATH holds no nft."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from convey.backend import cli, egress_nft, prepare
from convey.backend.state import BackendNatError, Entry, Method, State, UsageError, load_state, save_state
from convey.dataplane import kernel_state
from convey.errors import ConveyError
from convey.modes import Rewrite

VIP = "198.18.0.1"
SERVER = "198.18.1.2"
LB = "198.18.1.1"


def test_rewrite_ip_needs_the_balancer_and_says_what_to_add() -> None:
    with pytest.raises(UsageError) as info:
        prepare.plan("ip", VIP, 80)
    assert str(info.value) == prepare.NEEDS_BALANCER
    assert str(info.value).startswith("--rewrite ip needs --balancer ADDR")
    entry = prepare.plan("ip", VIP, 80, 8080, balancers=[LB])
    assert entry == Entry(Rewrite.IP, VIP, 80, 8080, method=Method.AUTO, balancers=(LB,))
    assert prepare.plan("mac", VIP, 80).balancers == ()  # mac leaves replies alone: no balancer needed


def test_plan_checks_its_arguments() -> None:
    with pytest.raises(BackendNatError, match="--vip must be an IPv4 address"):
        prepare.plan("ip", "198.18.0.300", 80, balancers=[LB])
    with pytest.raises(BackendNatError, match="--port must be 1-65535"):
        prepare.plan("ip", VIP, 0, balancers=[LB])
    with pytest.raises(BackendNatError, match="--balancer must be an IPv4 address"):
        prepare.plan("ip", VIP, 80, balancers=["lb.example"])
    with pytest.raises(BackendNatError, match="cannot restore the port"):
        prepare.plan("ip", VIP, 80, 8080, method="tc", balancers=[LB])
    with pytest.raises(UsageError, match="--rewrite must be one of ip, mac"):
        prepare.plan("nat", VIP, 80)
    assert issubclass(BackendNatError, ConveyError)


def test_the_nft_rule_leaves_replies_to_the_vip_and_the_balancers_alone() -> None:
    entry = Entry(Rewrite.IP, VIP, 80, 8080, SERVER, "eth0", Method.NFT, (LB, VIP))
    assert egress_nft.rule(entry) == (
        f'oifname "eth0" ip saddr {SERVER} ip daddr != {{ {VIP}, {LB} }} tcp sport 8080 ip saddr set {VIP} '
        f'tcp sport set 80 comment "convey-dsr {VIP}:80"'
    )
    script = egress_nft.script([entry], table_exists=False)
    assert script.splitlines()[:4] == [
        "table ip convey_dsr",
        "delete table ip convey_dsr",
        "table ip convey_dsr {",
        "\tchain postrouting {",
    ]
    assert egress_nft.script([], table_exists=True) == "table ip convey_dsr\ndelete table ip convey_dsr\n"


def test_the_record_round_trips_and_reads_the_old_format(tmp_path: Path) -> None:
    path = kernel_state.StateFile(tmp_path / "host.json")
    ip = Entry(Rewrite.IP, VIP, 80, 8080, SERVER, "eth0", Method.NFT, (LB,))
    mac = Entry(Rewrite.MAC, VIP, 443, 443, "", "eth0", None)
    state = State(entries=[ip, mac], sysctls={"k": {"old": "0", "new": "1"}}, lo_addrs=[VIP])
    save_state(path, state)
    assert load_state(path) == state
    doc = path.load()
    assert doc is not None
    doc["entries"][1]["method"] = ""  # as the tool wrote mac entries before Method existed
    path.save(doc)
    assert load_state(path).entries[1] == mac
    save_state(path, State())
    assert not path.exists()  # nothing installed: no record


# -- the command line against a fake kernel ------------------------------------------------------------------


class StubIPRoute:
    """A server with lo (1) and eth0 (2, SERVER/24), no default route."""

    fail_addr: int | None = None

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def link_lookup(self, ifname: str) -> list[int]:
        return {"lo": [1], "eth0": [2]}.get(ifname, [])

    def get_links(self, *indexes: int) -> list[Any]:
        return [Msg({"index": i}, IFLA_IFNAME={1: "lo", 2: "eth0"}[i]) for i in indexes or (1, 2)]

    def get_addr(self, family: int = 0, index: int | None = None) -> list[Any]:
        addrs = [Msg({"index": 2, "prefixlen": 24}, IFA_LOCAL=SERVER, IFA_ADDRESS=SERVER)]
        return [a for a in addrs if index is None or a["index"] == index]

    def get_routes(self, **_: Any) -> list[Any]:
        return []

    def addr(self, *_: Any, **__: Any) -> None:
        if StubIPRoute.fail_addr is not None:
            from pyroute2.netlink.exceptions import NetlinkError

            raise NetlinkError(StubIPRoute.fail_addr)

    def close(self) -> None:
        pass


class Msg(dict[str, Any]):
    def __init__(self, fields: dict[str, Any], **attrs: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


@pytest.fixture
def fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/proc/sys with the ARP settings, an empty PATH, the state under tmp_path/run; returns the proc root."""
    import pyroute2

    proc = tmp_path / "proc-sys"
    for conf in ("all", "eth0"):
        for key in ("arp_ignore", "arp_announce"):
            (proc / "net/ipv4/conf" / conf).mkdir(parents=True, exist_ok=True)
            (proc / "net/ipv4/conf" / conf / key).write_text("0\n")
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(kernel_state, "PROC_SYS", proc)
    monkeypatch.setattr(kernel_state, "STATE_ROOT", tmp_path / "run")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pyroute2, "IPRoute", StubIPRoute)
    StubIPRoute.fail_addr = None
    return proc


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


def test_the_readme_command_without_balancer_is_refused_before_root_is_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status, out, err = run(capsys, "install", "--vip", VIP, "--port", "80", "--rewrite", "ip")
    assert status == cli.EXIT_USAGE and out == ""
    assert err == f"setup-dsr-backend: {prepare.NEEDS_BALANCER}\n"
    status, _, err = run(capsys, "install", "--vip", VIP, "--port", "80", "--balancer", LB)
    assert status == cli.EXIT_ERROR
    assert err == "setup-dsr-backend: must run as root (it changes sysctls, addresses, tc or nftables)\n"


def test_nft_missing(fake_kernel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["install", "--vip", VIP, "--port", "80", "--balancer", LB, "--method", "nft"]
    status, out, err = run(capsys, *args)
    assert status == cli.EXIT_ERROR and out == ""
    assert err == (
        "setup-dsr-backend: install failed: the nft command is missing: install nftables "
        "(Debian: apt-get install nftables)\n"
    )
    assert not list(kernel_state.STATE_ROOT.rglob("*.json"))  # nothing installed, nothing recorded


def test_a_missing_interface(fake_kernel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "install", "--vip", VIP, "--port", "80", "--balancer", LB, "--dev", "nope0")
    assert status == cli.EXIT_ERROR
    assert err == "setup-dsr-backend: install failed: no interface 'nope0' here (interfaces: eth0, lo)\n"


def test_netlink_errors(fake_kernel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    StubIPRoute.fail_addr = errno.EPERM
    status, _, err = run(capsys, "install", "--rewrite", "mac", "--vip", VIP, "--port", "80")
    assert status == cli.EXIT_ERROR
    assert err == (
        f"setup-dsr-backend: install failed: install {VIP}:80: the kernel refused a netlink request: "
        "EPERM (Operation not permitted)\n"
    )


def test_mac_install_show_and_remove_on_the_fake_kernel(
    fake_kernel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "install", "--rewrite", "mac", "--vip", VIP, "--port", "80")
    assert status == cli.EXIT_OK, err
    assert "sysctl net.ipv4.conf.all.arp_ignore: 0 -> 1" in out and f"ip addr add {VIP}/32 dev lo" in out
    status, out, _ = run(capsys, "show")
    assert out == f"{VIP}:80: mac: {VIP}/32 on lo, arp_ignore=1 arp_announce=2 on all and eth0\n"
    status, out, err = run(capsys, "remove", "--vip", VIP, "--port", "80")
    assert status == cli.EXIT_OK, err
    assert (fake_kernel / "net/ipv4/conf/eth0/arp_announce").read_text() == "0\n"
    assert run(capsys, "show")[1] == "nothing installed\n"
