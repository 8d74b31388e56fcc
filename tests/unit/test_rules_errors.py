"""`convey rules install/remove/show` when the kernel or its tools fail: one line on stderr, exit status 2, never a
traceback, and nothing changed before the failure was found.

No root needed and nothing real is touched: the iptables tools are fakes on a PATH of their own (or absent),
/proc/sys is a temporary directory, the state files go to another, and pyroute2's IPRoute is a stub.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convey import cli
from convey.dataplane import kernel_state, rules

CONFIG = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "web_servers"

[backends.web_servers]
  [backends.web_servers.servers.one]
  addr = "198.18.1.2:8080"

[passthrough]
port_range = "40000-50000"
"""

SYSCTLS = {
    "net/ipv4/ip_forward": "0",
    "net/ipv4/conf/all/accept_local": "0",
    "net/ipv4/conf/all/rp_filter": "1",
    "net/ipv4/conf/all/send_redirects": "1",
    "net/ipv4/ip_local_reserved_ports": "",
}
EMPTY_RAW = "*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
NOT_ROOT = "iptables-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"


class StubIPRoute:
    """pyroute2's IPRoute as the rules need it, on a namespace with no addresses and no routes."""

    fail: int | None = None  # an errno every request fails with

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}

    def _answer(self, value: Any) -> Any:
        if StubIPRoute.fail is not None:
            from pyroute2.netlink.exceptions import NetlinkError

            raise NetlinkError(StubIPRoute.fail)
        return value

    def get_addr(self, **_: Any) -> list[Any]:
        return self._answer([])

    def get_links(self, *_: Any) -> list[Any]:
        return self._answer([])

    def get_rules(self, **_: Any) -> list[Any]:
        return self._answer([])

    def route(self, *_: Any, **__: Any) -> list[Any]:
        return self._answer([])

    def close(self) -> None:
        pass


class Kernel:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.proc = tmp / "proc-sys"
        for key, value in SYSCTLS.items():
            (self.proc / key).parent.mkdir(parents=True, exist_ok=True)
            (self.proc / key).write_text(value + "\n")
        self.run = tmp / "run-convey"
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.config = tmp / "convey.toml"
        self.config.write_text(CONFIG)
        monkeypatch.setattr(kernel_state, "PROC_SYS", self.proc)
        monkeypatch.setattr(kernel_state, "STATE_ROOT", self.run)
        monkeypatch.setenv("PATH", str(self.bin))
        import pyroute2

        StubIPRoute.fail = None
        monkeypatch.setattr(pyroute2, "IPRoute", StubIPRoute)

    def tool(self, name: str, stdout: str = "", stderr: str = "", status: int = 0) -> None:
        """A fake command on PATH printing ``stdout`` and ``stderr`` and exiting with ``status``."""
        path = self.bin / name
        path.write_text(
            f"#!/bin/sh\nprintf '%s' {_sh(stdout)}\nprintf '%s' {_sh(stderr)} >&2\nexit {status}\n"
        )
        path.chmod(0o755)

    def sysctls(self) -> dict[str, str]:
        return {key: (self.proc / key).read_text().strip() for key in SYSCTLS}

    def state_files(self) -> list[Path]:
        return sorted(self.run.glob("*.json")) if self.run.exists() else []


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kernel:
    return Kernel(tmp_path, monkeypatch)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def convey(capsys: pytest.CaptureFixture[str], kernel: Kernel) -> Run:
    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(["rules", *args, f"--config={kernel.config}"])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return status, out, err

    return run


@pytest.mark.parametrize("mode", [[], ["-d"]], ids=["passthrough", "dsr"])
@pytest.mark.parametrize("action", ["install", "remove"])
def test_iptables_missing(kernel: Kernel, convey: Run, action: str, mode: list[str]) -> None:
    before = kernel.sysctls()
    status, out, err = convey(action, *mode)
    assert status == cli.EXIT_STARTUP
    assert err == (
        f"convey: rules {action} failed: iptables-save not found: install iptables (the nft variant, iptables-nft)\n"
    )
    assert out == ""
    assert kernel.sysctls() == before and kernel.state_files() == []


def test_iptables_restore_missing_is_found_before_anything_changes(kernel: Kernel, convey: Run) -> None:
    kernel.tool("iptables-save", EMPTY_RAW)
    before = kernel.sysctls()
    status, _, err = convey("install")
    assert status == cli.EXIT_STARTUP
    assert (
        err
        == "convey: rules install failed: iptables-restore not found: install iptables (the nft variant, iptables-nft)\n"
    )
    assert kernel.sysctls() == before and kernel.state_files() == []


@pytest.mark.parametrize("action", ["install", "remove"])
def test_iptables_failing_not_root(kernel: Kernel, convey: Run, action: str) -> None:
    kernel.tool("iptables-save", stderr=NOT_ROOT + "\n", status=1)
    kernel.tool("iptables-restore")
    before = kernel.sysctls()
    status, _, err = convey(action)
    assert status == cli.EXIT_STARTUP
    assert err == f"convey: rules {action} failed: iptables-save -t raw failed: {NOT_ROOT}\n"
    assert kernel.sysctls() == before and kernel.state_files() == []


def test_iptables_restore_failing_after_the_sysctls_leaves_a_record_remove_undoes(
    kernel: Kernel, convey: Run
) -> None:
    kernel.tool("iptables-save", EMPTY_RAW)
    kernel.tool("iptables-restore", stderr="iptables-restore: line 3 failed\n", status=1)
    before = kernel.sysctls()
    status, out, err = convey("install")
    assert status == cli.EXIT_STARTUP
    assert (
        err
        == "convey: rules install failed: iptables-restore --noflush failed: iptables-restore: line 3 failed\n"
    )
    assert kernel.sysctls()["net/ipv4/ip_forward"] == "1"  # set before iptables, as install's order says
    [state] = kernel.state_files()
    recorded = json.loads(state.read_text())["sysctls"]
    assert recorded["net.ipv4.ip_forward"] == {"old": "0", "new": "1"}
    assert recorded["net.ipv4.conf.all.rp_filter"] == {"old": "1", "new": "2"}
    status, out, err = convey("remove")
    assert status == cli.EXIT_OK, err
    assert "sysctl net.ipv4.ip_forward: 1 -> 0" in out.splitlines()
    assert kernel.sysctls() == before and kernel.state_files() == []


def test_netlink_errors(kernel: Kernel, convey: Run) -> None:
    kernel.tool("iptables-save", EMPTY_RAW)
    kernel.tool("iptables-restore")
    StubIPRoute.fail = errno.EPERM
    before = kernel.sysctls()
    status, _, err = convey("install")
    assert status == cli.EXIT_STARTUP
    assert err == (
        "convey: rules install failed: rules install (passthrough): the kernel refused a netlink request: "
        "EPERM (Operation not permitted)\n"
    )
    assert kernel.sysctls() == before and kernel.state_files() == []
    # remove with policy routing on record to undo: the same kind of message
    kernel.run.mkdir()
    routing = {"local_moved": {"from": 0, "to": 101, "protocol": 2}}
    kernel_state.StateFile.here().save({"sysctls": {}, "routing": routing})
    status, _, err = convey("remove", "-d")
    assert status == cli.EXIT_STARTUP
    assert err == (
        "convey: rules remove failed: rules remove: the kernel refused a netlink request: "
        "EPERM (Operation not permitted)\n"
    )


def test_show_needs_no_tools(kernel: Kernel, convey: Run) -> None:
    status, out, err = convey("show", "-d")
    assert status == cli.EXIT_OK and err == ""
    assert out.endswith("COMMIT\n") and "-j NFQUEUE --queue-num 0" in out


def test_sysctl_errors_are_messages(kernel: Kernel, convey: Run) -> None:
    kernel.tool("iptables-save", EMPTY_RAW)
    kernel.tool("iptables-restore")
    (kernel.proc / "net/ipv4/ip_forward").unlink()
    status, _, err = convey("install")
    assert status == cli.EXIT_STARTUP
    assert err.startswith("convey: rules install failed: sysctl net.ipv4.ip_forward: no such parameter")


def test_errors_raised_on_purpose_derive_from_convey_error() -> None:
    from convey.errors import ConveyError

    assert issubclass(rules.RulesError, ConveyError)
