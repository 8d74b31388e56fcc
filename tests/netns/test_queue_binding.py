"""convey's own NFQUEUE binding (``[passthrough] queue_binding = "netlink"``) on a routed test bed (root only).

What it must do that the netfilterqueue binding cannot: take whole GSO packets (up to ~64 KB a verdict) and
rewrite those whose TCP checksum the kernel left partial (``NFQA_SKB_CSUMNOTREADY``) with a full checksum, so a
bulk transfer arrives intact; and pass frames larger than 4016 bytes (MTU 9000 in the bed). A queue another
process holds is a clear start error. Every transfer is checked with sha256 end to end and against /stats.
Each mode's first end-to-end check (test_passthrough.py, test_dsr.py) runs here once more with this binding.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess, ConveyProcessError
from testbed.dsr import VIP_PORT as DSR_VIP_PORT
from testbed.dsr import dsr_config
from testbed.httpd import payload_sha256
from testbed.process import python_env, read_line
from tests.netns import test_dsr, test_passthrough
from tests.netns.test_passthrough import (
    assert_clean,
    client,
    make_config,
    settled_with,
    start_servers,
    stop_clean,
)

SIZE = 200 * 1024 * 1024
NETLINK = 'queue_binding = "netlink"'  # a line of [dsr]
dsr_bed = contextlib.contextmanager(test_dsr.dsr_bed)  # removed even when the test fails


@pytest.fixture
def beds() -> Iterator[Callable[..., Testbed]]:
    made: list[Testbed] = []

    def make(servers: int = 1) -> Testbed:
        bed = Testbed.create(kind="routed", servers=servers)
        made.append(bed)
        return bed

    yield make
    for bed in made:
        bed.destroy()


def set_mtu(bed: Testbed, mtu: int) -> None:
    """Every interface of the bed (both ends of every veth pair) to ``mtu``."""
    for host in bed.hosts:
        for link in host.links:
            host.run(["ip", "link", "set", "dev", link.iface, "mtu", str(mtu)])


def transfer_both_ways(bed: Testbed, convey: ConveyProcess, size: int) -> dict[str, Any]:
    """A download and an upload of ``size`` bytes through convey, sha256-checked; the settled /stats."""
    down = client(bed, "get", n=1, path=f"/bytes/{size}", timeout=120, run_timeout=180)[0]
    assert down["error"] is None and down["status"].startswith("HTTP/1.1 200"), down
    assert down["received"] - down["header_len"] == size
    assert down["sha256"] == payload_sha256(size)
    up = client(bed, "upload", size=size, timeout=120, run_timeout=180)
    assert up["error"] is None and up["status"].startswith("HTTP/1.1 200"), up
    assert up["body_start"] == payload_sha256(size)  # the server's sha256 of what it received
    sent, received = down["sent"] + up["sent"], down["received"] + up["received"]
    doc = convey.wait_stats(settled_with(sent, received), 15, "both flows closed")
    assert_clean(doc)
    assert doc["total_connections"] == 2
    return doc


def test_200mb_both_ways_with_gso_packets_arrive_intact(beds: Callable[..., Testbed]) -> None:
    bed = beds()
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, queue_binding="netlink")).start()
    doc = transfer_both_ways(bed, convey, SIZE)
    queue = doc["packet"]["queue"]
    assert queue["verdict_errors"] == queue["verdict_send_errors"] == queue["no_verdict"] == 0
    # the kernel handed over GSO packets, whose checksums its segmentation set up; partial checksums of the
    # other packets were completed
    assert queue["gso_packets"] > 0, queue
    assert queue["kernel_checksums"] > 0, queue
    assert queue["full_checksums"] > 0, queue
    verdicts = doc["packet"]["verdicts"]
    per_verdict = (verdicts["bytes_tx"] + verdicts["bytes_rx"]) / (
        verdicts["ingress_accepted"] + verdicts["return_accepted"]
    )
    assert per_verdict > 2000, f"{per_verdict:.0f} payload bytes per verdict: no GSO-sized verdicts"
    stop_clean(convey)


@pytest.mark.parametrize("gso", ["1", "0"], ids=["gso", "no_gso"])
def test_jumbo_frames_pass(beds: Callable[..., Testbed], gso: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MTU 9000: frames of ~9000 bytes reach the queue whole (netfilterqueue would cut them at 4016 bytes and
    the packet core would drop them as ``too_long``); without GSO every verdict is one such frame."""
    monkeypatch.setenv("CONVEY_QUEUE_GSO", gso)
    bed = beds()
    set_mtu(bed, 9000)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, queue_binding="netlink")).start()
    doc = transfer_both_ways(bed, convey, 20 * 1024 * 1024)
    assert doc["packet"]["verdicts"]["too_long"] == 0
    queue = doc["packet"]["queue"]
    assert queue["cut_packets"] == 0
    if gso == "0":
        assert queue["gso_packets"] == 0
        verdicts = doc["packet"]["verdicts"]
        per_verdict = (verdicts["bytes_tx"] + verdicts["bytes_rx"]) / (
            verdicts["ingress_accepted"] + verdicts["return_accepted"]
        )
        assert per_verdict > 4016, f"{per_verdict:.0f} payload bytes per verdict: no jumbo frames"
    stop_clean(convey)


HOLD_QUEUE = textwrap.dedent(
    """
    import socket, sys
    from convey.dataplane import nfq_netlink as nl
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    sock.bind((0, 0))
    sock.send(nl.config_bind(int(sys.argv[1]), 1))
    error, _ = nl.decode_error(sock.recv(65536))
    print("ready" if error == 0 else f"error {error}", flush=True)
    sys.stdin.readline()
    """
)


def test_a_queue_held_by_another_process_is_a_clear_start_error(beds: Callable[..., Testbed]) -> None:
    bed = beds()
    holder = bed.lb.popen([sys.executable, "-c", HOLD_QUEUE, "7"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          env=python_env())  # fmt: skip
    try:
        assert read_line(holder, 10) == "ready"
        with pytest.raises(ConveyProcessError) as failed:
            ConveyProcess(bed, make_config(bed, queue_binding="netlink", queue_num=7)).start()
        text = str(failed.value)
        assert "NFQUEUE 7" in text and "cat /proc/net/netfilter/nfnetlink_queue" in text, text[-2000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        holder.kill()
        holder.wait(10)


# -- every mode's basic end-to-end check with the netlink binding ----------------------------------------------


@pytest.mark.parametrize("offload", [False, True], ids=["per_packet", "offload"])
def test_passthrough_requests_follow_weights_with_the_netlink_binding(
    beds: Callable[..., Testbed], offload: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_passthrough.py's first check, unchanged, with ``[passthrough] queue_binding = "netlink"``."""
    monkeypatch.setattr(
        test_passthrough, "make_config", functools.partial(make_config, queue_binding="netlink")
    )
    test_passthrough.test_requests_follow_weights_and_servers_see_the_balancer(beds, offload)


@pytest.mark.parametrize(
    ("rewrite", "offload"), [("ip", False), ("mac", False), ("ip", True)], ids=["ip", "mac", "ip-offload"]
)
def test_dsr_spreads_and_replies_bypass_the_balancer_with_the_netlink_binding(
    rewrite: str, offload: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """test_dsr.py's first check, unchanged, on the L2 bed with ``[dsr] queue_binding = "netlink"``."""
    monkeypatch.setattr(test_dsr, "dsr_config", functools.partial(dsr_config, extra=NETLINK))
    with dsr_bed("l2", rewrite) as bed:
        test_dsr.test_dsr_spreads_by_weight_and_replies_bypass_the_balancer(bed, offload)


def test_dsr_ip_upload_with_gso_packets_arrives_intact() -> None:
    """A 50 MB upload through DSR ``ip`` with the netlink binding: GSO packets rewritten (their checksums left to
    the kernel's segmentation), the replies straight from the server; the server's sha256 of what it got."""
    with dsr_bed("l2", "ip") as dsr:
        bed = dsr.bed
        with ConveyProcess(bed, dsr_config(bed, "ip", extra=NETLINK), mode="dsr") as lb:
            size = 50 * 1024 * 1024
            up = client(bed, "upload", size=size, port=DSR_VIP_PORT, timeout=120, run_timeout=180)
            assert up["error"] is None and up["status"].startswith("HTTP/1.1 200"), up
            assert up["body_start"] == payload_sha256(size)
            queue = lb.stats()["packet"]["queue"]
            assert queue["gso_packets"] > 0 and queue["kernel_checksums"] > 0, queue
            assert queue["verdict_errors"] == queue["no_verdict"] == 0, queue
