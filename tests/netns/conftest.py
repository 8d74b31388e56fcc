"""Fixtures for tests that build real network namespaces (root only; skipped with the reason otherwise)."""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.testbed import Testbed, delete_namespace

HERE = Path(__file__).resolve().parent


@functools.cache
def netns_unusable() -> str | None:
    """Why namespace tests cannot run here, or None when they can (probed once: create and delete one)."""
    if os.geteuid() != 0:
        return "needs root (euid 0) to build network namespaces"
    for tool in ("ip", "iptables-save", "iptables-restore", "sysctl", "curl"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    probe = f"cvy-{secrets.token_hex(3)}-probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, text=True, timeout=10)
        subprocess.run(
            ["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"],
            check=True, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        return f"`ip netns` is unusable here: {str(detail).strip()}"
    finally:
        delete_namespace(probe)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "netns: needs root and builds real network namespaces")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    reason = netns_unusable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def routed_bed() -> Iterator[Testbed]:
    """A routed bed: client -- lb -- 2 servers, each on its own veth pair (see tests/netns/testbed.py)."""
    bed = Testbed.create(kind="routed", servers=2)
    try:
        yield bed
    finally:
        bed.destroy()


@pytest.fixture
def l2_bed() -> Iterator[Testbed]:
    """An L2 bed: client, lb and 2 servers on one bridge (198.19.0.0/24, VIP 198.19.0.100 on the lb)."""
    bed = Testbed.create(kind="l2", servers=2)
    try:
        yield bed
    finally:
        bed.destroy()
