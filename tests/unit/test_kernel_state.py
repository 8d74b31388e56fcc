"""convey.dataplane.kernel_state without root: sysctls on a fake /proc/sys, the record-and-restore both the rules
and the backend tool use, the state file in a temporary directory, and netlink errors turned into messages."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

from convey.dataplane import kernel_state
from convey.errors import ConveyError

# -- sysctls on a fake /proc/sys ------------------------------------------------------------------------------


@pytest.fixture
def proc_sys(tmp_path: Path) -> Path:
    for key, value in {
        "net/ipv4/ip_forward": "0\n",
        "net/ipv4/ip_local_port_range": "32768\t60999\n",
        "net/ipv4/conf/eth0.100/accept_local": "0\n",
    }.items():
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    return tmp_path


def test_sysctl_write_reports_changes(proc_sys: Path) -> None:
    assert kernel_state.read("net.ipv4.ip_local_port_range", proc_sys) == "32768 60999"
    change = kernel_state.write("net.ipv4.ip_forward", 1, proc_sys)
    assert change == kernel_state.Change("net.ipv4.ip_forward", "0", "1")
    assert str(change) == "sysctl net.ipv4.ip_forward: 0 -> 1"
    assert kernel_state.write("net.ipv4.ip_forward", "1", proc_sys) is None
    assert (proc_sys / "net/ipv4/ip_forward").read_text() == "1\n"


def test_sysctl_keys_with_dotted_interfaces(proc_sys: Path) -> None:
    key = kernel_state.conf_key("eth0.100", "accept_local")
    assert key == "net/ipv4/conf/eth0.100/accept_local"
    assert kernel_state.conf_key("eth0", "accept_local") == "net.ipv4.conf.eth0.accept_local"
    assert kernel_state.apply({key: 1}, proc_sys) == [kernel_state.Change(key, "0", "1")]


def test_sysctl_restore_leaves_values_changed_since(proc_sys: Path) -> None:
    changes = kernel_state.apply(
        {"net.ipv4.ip_forward": 1, "net/ipv4/conf/eth0.100/accept_local": 1}, proc_sys
    )
    kernel_state.write("net.ipv4.ip_forward", 0, proc_sys)  # someone else, later
    kernel_state.write("net.ipv4.ip_forward", 2, proc_sys)
    undone = kernel_state.restore(changes, proc_sys)
    assert undone == [kernel_state.Change("net/ipv4/conf/eth0.100/accept_local", "1", "0")]
    assert kernel_state.read("net.ipv4.ip_forward", proc_sys) == "2"
    assert kernel_state.restore(changes, proc_sys, force=True) == [
        kernel_state.Change("net.ipv4.ip_forward", "2", "0")
    ]


def test_sysctl_errors_name_the_key(proc_sys: Path) -> None:
    with pytest.raises(kernel_state.SysctlError, match=r"net\.ipv4\.nope"):
        kernel_state.read("net.ipv4.nope", proc_sys)
    with pytest.raises(kernel_state.SysctlError):
        kernel_state.path_of("net/../../etc/passwd", proc_sys)


def test_every_error_is_a_convey_error() -> None:
    for error in (kernel_state.SysctlError, kernel_state.StateFileError, kernel_state.NetlinkFailure):
        assert issubclass(error, ConveyError)


def test_sysctl_root_is_looked_up_at_call_time(proc_sys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_state, "PROC_SYS", proc_sys)
    assert kernel_state.read("net.ipv4.ip_forward") == "0"
    assert kernel_state.path_of("net.ipv4.ip_forward") == proc_sys / "net/ipv4/ip_forward"


# -- record and restore --------------------------------------------------------------------------------------


def test_recorded_writes_keep_the_first_old_value(proc_sys: Path) -> None:
    recorded: kernel_state.Recorded = {}
    key = "net.ipv4.ip_forward"
    assert kernel_state.write_recorded(recorded, key, 1, proc_sys) == kernel_state.Change(key, "0", "1")
    assert kernel_state.write_recorded(recorded, key, 1, proc_sys) is None  # unchanged: nothing recorded anew
    assert kernel_state.write_recorded(recorded, key, 2, proc_sys) == kernel_state.Change(key, "1", "2")
    assert recorded == {key: {"old": "0", "new": "2"}}
    assert kernel_state.restore_recorded(recorded, root=proc_sys) == ["sysctl net.ipv4.ip_forward: 2 -> 0"]
    assert recorded == {}
    assert kernel_state.read(key, proc_sys) == "0"


def test_restore_recorded_leaves_what_changed_since_and_only_the_keys_asked(proc_sys: Path) -> None:
    recorded: kernel_state.Recorded = {}
    dotted = "net/ipv4/conf/eth0.100/accept_local"
    kernel_state.write_recorded(recorded, "net.ipv4.ip_forward", 1, proc_sys)
    kernel_state.write_recorded(recorded, dotted, 1, proc_sys)
    kernel_state.write(dotted, 0, proc_sys)  # someone else, later
    assert kernel_state.restore_recorded(recorded, ["net.ipv4.ip_forward"], proc_sys) == [
        "sysctl net.ipv4.ip_forward: 1 -> 0"
    ]
    assert list(recorded) == [dotted]
    kernel_state.write(dotted, 2, proc_sys)
    assert kernel_state.restore_recorded(recorded, root=proc_sys) == [
        f"sysctl {dotted}: left at 2 (convey had set 1; changed since)"
    ]
    assert recorded == {}
    assert kernel_state.read(dotted, proc_sys) == "2"


def test_restore_recorded_forgets_keys_that_are_gone(proc_sys: Path) -> None:
    recorded = {"net.ipv4.conf.gone0.arp_ignore": {"old": "0", "new": "1"}}
    assert kernel_state.restore_recorded(recorded, root=proc_sys) == []
    assert recorded == {}


# -- the state file ------------------------------------------------------------------------------------------


def test_state_file_round_trip_and_removal(tmp_path: Path) -> None:
    state = kernel_state.StateFile.here(tmp_path / "sub")
    assert state.path.parent == tmp_path / "sub"
    assert state.path.name == f"{kernel_state.namespace_name()}.json"
    assert state.load() is None and not state.exists()
    state.save({"sysctls": {"k": {"old": "0", "new": "1"}}})
    assert state.load() == {"version": kernel_state.STATE_VERSION, "sysctls": {"k": {"old": "0", "new": "1"}}}
    assert not list(state.path.parent.glob("*.tmp"))  # written atomically, nothing left beside it
    state.remove()
    state.remove()  # fine when already gone
    assert not state.exists()


def test_state_file_of_a_tool_lives_below_the_state_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(kernel_state, "STATE_ROOT", tmp_path)
    assert kernel_state.StateFile.here(tool="backend-nat").path.parent == tmp_path / "backend-nat"
    assert kernel_state.StateFile.here().path.parent == tmp_path
    assert kernel_state.StateFile.here(tmp_path / "x", tool="backend-nat").path.parent == tmp_path / "x"


def test_removing_the_last_record_removes_the_empty_state_directories(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "convey"
    monkeypatch.setattr(kernel_state, "STATE_ROOT", root)
    tool, plain = kernel_state.StateFile.here(tool="backend-nat"), kernel_state.StateFile.here()
    tool.save({})
    plain.save({})
    tool.remove()
    assert not (root / "backend-nat").exists() and root.is_dir()  # the other record keeps the root
    plain.remove()
    assert not root.exists() and tmp_path.is_dir()  # nothing above the root is touched
    elsewhere = kernel_state.StateFile.here(tmp_path / "x")
    elsewhere.save({})
    elsewhere.remove()
    assert (tmp_path / "x").is_dir()  # a directory given by the caller stays


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "cannot read convey state"), (json.dumps({"version": 99}), "has an unknown format")],
)
def test_a_bad_state_file_is_refused_with_its_path(tmp_path: Path, text: str, message: str) -> None:
    state = kernel_state.StateFile(tmp_path / "x.json")
    state.path.write_text(text)
    with pytest.raises(kernel_state.StateFileError, match=message) as info:
        state.load()
    assert str(state.path) in str(info.value) and "remove it after checking" in str(info.value)


def test_an_unwritable_state_file_is_a_state_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(kernel_state.StateFileError, match="cannot write convey state"):
        kernel_state.StateFile(blocker / "x.json").save({})


# -- netlink -------------------------------------------------------------------------------------------------


class FakeIPRoute:
    """Stands in for pyroute2's IPRoute: records that it was closed."""

    instances: list[FakeIPRoute] = []

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.closed = False
        FakeIPRoute.instances.append(self)

    def close(self) -> None:
        self.closed = True


def test_iproute_turns_an_unhandled_netlink_error_into_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2
    from pyroute2.netlink.exceptions import NetlinkError

    monkeypatch.setattr(pyroute2, "IPRoute", FakeIPRoute)
    with pytest.raises(kernel_state.NetlinkFailure) as info, kernel_state.iproute("adding a route") as ipr:
        assert ipr.status == {"nlm_generator": False}  # pyroute2 0.9.7's nlm_request needs the key
        raise NetlinkError(errno.EPERM)
    assert str(info.value) == (
        "adding a route: the kernel refused a netlink request: EPERM (Operation not permitted)"
    )
    assert FakeIPRoute.instances[-1].closed
    # one handled inside the block stays there
    with kernel_state.iproute("x"):
        try:
            raise NetlinkError(errno.ENOENT)
        except NetlinkError:
            pass
    assert FakeIPRoute.instances[-1].closed
