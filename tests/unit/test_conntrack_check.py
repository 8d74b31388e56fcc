"""What offload needs from the kernel (convey.dataplane.conntrack_check), on fake /proc trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from convey.dataplane.conntrack_check import Missing, OffloadUnavailable, missing, require
from convey.errors import ConveyError

ALL_MATCHES = ["conntrack", "connmark", "mark", "tcp", "multiport"]
ALL_TARGETS = ["NFQUEUE", "CONNMARK", "DNAT", "SNAT", "CT", "MARK"]


def fake_proc(
    tmp_path: Path,
    sysctls: tuple[str, ...] = ("nf_conntrack_max", "nf_conntrack_acct", "nf_conntrack_events"),
    matches: list[str] | None = None,
    targets: list[str] | None = None,
) -> Path:
    netfilter = tmp_path / "sys/net/netfilter"
    netfilter.mkdir(parents=True)
    for name in sysctls:
        (netfilter / name).write_text("1\n")
    (tmp_path / "net").mkdir()
    if matches is not None:
        (tmp_path / "net/ip_tables_matches").write_text("\n".join(matches) + "\n")
    if targets is not None:
        (tmp_path / "net/ip_tables_targets").write_text("\n".join(targets) + "\n")
    return tmp_path


def nothing_loadable(module: str) -> bool:
    return False


def test_complete_kernel(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, matches=ALL_MATCHES, targets=ALL_TARGETS)
    assert missing(proc, nothing_loadable, ctnetlink=lambda: None) == []
    require([])  # nothing raised


def test_no_conntrack_is_one_clear_item_each(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, sysctls=(), matches=ALL_MATCHES, targets=ALL_TARGETS)
    found = missing(proc, nothing_loadable)
    assert [m.what for m in found] == [
        "sysctl net.netfilter.nf_conntrack_max",
        "sysctl net.netfilter.nf_conntrack_acct",
        "sysctl net.netfilter.nf_conntrack_events",
    ]
    assert "modprobe nf_conntrack" in found[0].how and "CONFIG_NF_CONNTRACK" in found[0].how
    assert "CONFIG_NF_CONNTRACK_EVENTS" in found[2].how


def test_missing_extensions_and_what_to_do(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, matches=["conntrack", "mark"], targets=["NFQUEUE", "DNAT", "SNAT", "CT"])
    found = missing(proc, nothing_loadable)
    assert [m.what for m in found] == ["xtables match connmark", "xtables target CONNMARK"]
    assert (
        found[1].how
        == "load it with `modprobe xt_connmark`, or use a kernel built with CONFIG_NETFILTER_XT_CONNMARK"
    )


def test_loadable_modules_are_not_missing(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, matches=[], targets=[])
    assert missing(proc, loadable=lambda module: True) == []
    seen: list[str] = []
    missing(proc, loadable=lambda module: seen.append(module) or module != "xt_CT")
    assert "xt_CT" in seen and "xt_NFQUEUE" in seen


def test_dsr_mac_needs_no_nat(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, matches=ALL_MATCHES, targets=["NFQUEUE", "CONNMARK", "CT"])
    assert missing(proc, nothing_loadable, need=("NFQUEUE", "CONNMARK", "CT")) == []
    assert [m.what for m in missing(proc, nothing_loadable)] == ["xtables target DNAT", "xtables target SNAT"]


def test_ctnetlink_probe_failure(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, matches=ALL_MATCHES, targets=ALL_TARGETS)
    (found,) = missing(proc, nothing_loadable, ctnetlink=lambda: "the kernel answered EOPNOTSUPP")
    assert found.what == "conntrack netlink interface" and "EOPNOTSUPP" in found.why
    assert "nf_conntrack_netlink" in found.how


def test_require_names_everything_in_one_convey_error() -> None:
    items = [Missing("xtables target CT", "DSR: keep SYNs out of conntrack", "load it with `modprobe xt_CT`")]
    with pytest.raises(OffloadUnavailable) as info:
        require(items, what="--dsr --offload")
    assert isinstance(info.value, ConveyError)
    assert str(info.value) == (
        "--dsr --offload needs kernel features this system lacks:\n"
        "  - xtables target CT (DSR: keep SYNs out of conntrack): load it with `modprobe xt_CT`"
    )
