"""The README's command for DSR servers, run as written in a 2-server L2 bed with `rewrite = "ip"`.

The bug it guards against: an egress NAT that also rewrote the replies to the balancer's health checks, so they
came back from the VIP and every server was marked down after three failed checks. The README's command must
either work (every request answered, both servers up after more checks than ``fall``) or be refused with a
message saying what to add. The command is read from README.md itself, so the two cannot drift apart; a
negative control (the balancer's address wrong) shows the observation does catch servers marked down.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from convey.backend.prepare import NEEDS_BALANCER
from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.dsr import BACKEND_STATE_DIR, VIP_PORT, dsr_config, fetch_many, setup_script, unprepare_servers
from testbed.httpd_proc import start_httpd
from testbed.process import REPO_ROOT

REQUESTS = 30
FALL = 3
INTERVAL = 0.5


def readme_command() -> list[str]:
    """The words of the README's `scripts/setup-dsr-backend.sh install ...` line, optional [...] parts left out."""
    lines = [
        line
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith("scripts/setup-dsr-backend.sh install ")
    ]
    assert len(lines) == 1, lines
    words = re.sub(r"\[[^\]]*\]", "", lines[0].partition("#")[0]).split()
    assert words[:2] == ["scripts/setup-dsr-backend.sh", "install"], words
    assert {w for w in words if w.isupper()} == {"VIP", "PORT", "LB_ADDR"}, words
    return words[1:]


def filled(words: list[str], bed: Testbed, lb_addr: str) -> list[str]:
    values = {"VIP": bed.vip, "PORT": str(VIP_PORT), "LB_ADDR": lb_addr}
    return [values.get(w, w) for w in words]


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A 2-server L2 bed (one segment: the health checks and the replies to clients leave by the same
    interface), each server's web server on the VIP's port, as the README's command (no --server-port) needs."""
    bed = Testbed.create(kind="l2", servers=2)
    try:
        for server in bed.servers:
            start_httpd(server, VIP_PORT, name=server.role, bind="0.0.0.0")
        yield bed
    finally:
        try:
            unprepare_servers(bed)
        finally:
            bed.destroy()


def servers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    detail: dict[str, dict[str, Any]] = doc["backends"]["web_servers"]["server_detail"]
    return detail


def checked(times: int) -> Any:
    return lambda doc: all(s["checks_ok"] + s["checks_failed"] >= times for s in servers(doc).values())


def install_all(bed: Testbed, words: list[str], lb_addr: str) -> None:
    for server in bed.servers:
        proc = setup_script(server, *filled(words, bed, lb_addr), check=False)
        assert proc.returncode == 0, proc.stderr


def test_the_readmes_dsr_server_command_keeps_every_server_up(bed: Testbed) -> None:
    words = readme_command()
    config = dsr_config(bed, "ip", server_port=VIP_PORT, health_interval=INTERVAL, fall=FALL)

    # Without --balancer (the README's line before the fix): refused, saying what to add, nothing installed.
    at = words.index("--balancer")
    bare = filled(words[:at] + words[at + 2 :], bed, "")
    proc = setup_script(bed.servers[0], *bare, "--rewrite", "ip", check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"setup-dsr-backend: {NEEDS_BALANCER}\n"
    assert not (BACKEND_STATE_DIR / f"{bed.servers[0].ns}.json").exists()

    # Negative control: a --balancer that is not where the checks come from: the replies to the health checks
    # leave from the VIP, and both servers go down.
    install_all(bed, words, "198.19.0.250")
    with ConveyProcess(bed, config, mode="dsr", name="convey-wrong-balancer") as lb:
        doc = lb.wait_stats(
            lambda doc: not any(s["healthy"] for s in servers(doc).values()), 15, "both servers down"
        )
        assert all(s["checks_ok"] == 0 for s in servers(doc).values()), servers(doc)
        lb.stop()
    unprepare_servers(bed)

    # The README's command as written: every request answered, both servers up, no check failed.
    install_all(bed, words, bed.lb.addr)
    with ConveyProcess(bed, config, mode="dsr", name="convey-readme") as lb:
        lb.wait_stats(checked(FALL + 1), 15, f"{FALL + 1} health checks of each server")
        result = fetch_many(bed.client, bed.vip, VIP_PORT, REQUESTS)
        assert result["failed"] == 0, result
        assert sum(result["counts"].values()) == REQUESTS
        assert set(result["counts"]) == {"server0", "server1"}, result
        doc = lb.wait_stats(checked(FALL + 2), 15, "more health checks after the requests")
        for name, server in servers(doc).items():
            assert server["healthy"] and server["checks_failed"] == 0, (name, server)
        lb.stop()
