"""Passthrough offload's bytes from the kernel's byte counters: the nft table rendered, its listing parsed, the
totals turned into payload bytes (ByteTally) and attributed to the stats scopes. Pure, no kernel."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from convey.config import parse_config
from convey.dataplane.conntrack_check import OffloadUnavailable
from convey.dataplane.conntrack_records import HeaderSizes
from convey.dataplane.offload_bytes import ByteTally
from convey.dataplane.rules import byte_counters, offload_kernel
from convey.dataplane.rules.byte_counters import Totals
from convey.dataplane.rules.offload import (
    CLOSE_BITS,
    RESET_SEEN,
    SERVER_FIELD,
    WORKER_FIELD,
    byte_key_mask,
    offload_plan,
    render_byte_counters,
    show,
)
from convey.modes import Mode
from tests.unit.test_packet_offload import VIP, _acc
from tests.unit.test_rules_offload import CONFIG

VIP4 = socket.inet_aton(VIP)
KEY = (0x101, VIP4, 80)
SIZES = HeaderSizes(data=52, first=60)


def test_the_table_counts_our_marked_packets_by_mark_direction_and_vip() -> None:
    cfg = parse_config(CONFIG, "x.toml")
    plan = offload_plan(cfg, Mode.PASSTHROUGH)
    mask = byte_key_mask(plan)
    assert mask & (CLOSE_BITS | RESET_SEEN) == 0 and mask & SERVER_FIELD == SERVER_FIELD
    text = render_byte_counters(plan)
    assert text.startswith("table ip convey_bytes {")
    assert f"ct mark & {SERVER_FIELD:#x} != 0" in text
    assert f"update @conns {{ ct mark & {mask:#x} . ct direction . ct original ip daddr" in text
    assert "type filter hook forward" in text and "flags dynamic" in text and "counter" in text
    assert f'comment "convey offload bytes: key mask {mask:#x}"' in text
    # `rules show` prints it, commented (the output stays iptables-restore input)
    shown = show(cfg, "passthrough", plan)
    assert "#   table ip convey_bytes {" in shown
    assert "convey_bytes" not in show(cfg, "dsr")


def _listing(*elems: tuple[int, str, str, int, int, int]) -> str:
    return json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6"}},
                {
                    "set": {
                        "family": "ip",
                        "name": "conns",
                        "table": "convey_bytes",
                        "elem": [
                            {
                                "elem": {
                                    "val": {"concat": [mark, way, addr, port]},
                                    "counter": {"packets": packets, "bytes": size},
                                }
                            }
                            for mark, way, addr, port, packets, size in elems
                        ],
                    }
                },
            ]
        }
    )


def test_a_listing_gives_totals_per_key_both_ways_and_skips_what_is_not_ours() -> None:
    text = _listing(
        (0x101, "original", VIP, 80, 10, 600),
        (0x101, "reply", VIP, 80, 20, 30_000),
        (0x201, "original", VIP, 443, 1, 60),
    )
    doc = json.loads(text)
    doc["nftables"][1]["set"]["elem"].append({"elem": {"val": {"concat": [1, 2]}}})  # not our shape
    doc["nftables"][1]["set"]["elem"].append({"elem": {"val": {"concat": [1, "original", "nope", 80]}}})
    found = byte_counters.parse_elements(json.dumps(doc))
    assert found == {
        KEY: Totals(10, 600, 20, 30_000),
        (0x201, VIP4, 443): Totals(1, 60, 0, 0),
    }
    assert byte_counters.parse_elements('{"nftables": []}') == {}


def test_the_tally_starts_from_a_baseline_and_reports_payload_growth() -> None:
    tally = ByteTally(sizes=SIZES)
    tally.start({KEY: Totals(100, 100_000, 100, 100_000)})  # before this process: not ours to count
    assert tally.update({KEY: Totals(100, 100_000, 100, 100_000)}) == []
    tally.decided(KEY)
    # one connection: SYN (60) + 2 data packets of 1000 payload (52 + 1000) each way, SYN-ACK (60) back
    grown = tally.update({KEY: Totals(103, 100_000 + 60 + 2104, 103, 100_000 + 60 + 2104)})
    assert grown == [(KEY, 2000, 2000)]
    assert tally.update({KEY: Totals(103, 100_000 + 60 + 2104, 103, 100_000 + 60 + 2104)}) == []
    assert tally.readings == 3


def test_a_table_made_again_counts_on_from_zero_without_losing_or_doubling() -> None:
    tally = ByteTally(sizes=SIZES)
    tally.start({})
    assert tally.update({KEY: Totals(2, 104 + 1000, 0, 0)}) == [(KEY, 1000, 0)]
    # the table was re-created (a rules re-install): smaller totals, counted from zero again
    assert tally.update({KEY: Totals(1, 52 + 500, 0, 0)}) == [(KEY, 500, 0)]
    assert tally.update({KEY: Totals(2, 104 + 700, 0, 0)}) == [(KEY, 200, 0)]


def test_a_syn_decided_before_a_reading_and_answered_after_it_is_made_up_later() -> None:
    tally = ByteTally(sizes=SIZES)
    tally.start({})
    tally.decided(KEY)
    # the SYN was counted, the SYN-ACK not yet: the reply's first-packet allowance has nothing to apply to
    assert tally.update({KEY: Totals(1, 60, 0, 0)}) == []
    assert tally.update({KEY: Totals(2, 60 + 52 + 10, 2, 60 + 52 + 20)}) == [(KEY, 10, 20)]


def test_only_this_workers_keys_count_in_a_worker() -> None:
    own, other = (2 << 24) | 0x101, (1 << 24) | 0x101
    tally = ByteTally(worker_mask=WORKER_FIELD, worker_bits=2 << 24, sizes=SIZES)
    tally.start({})
    found = tally.update(
        {(own, VIP4, 80): Totals(1, 52 + 5, 0, 0), (other, VIP4, 80): Totals(1, 52 + 7, 0, 0)}
    )
    assert found == [((own, VIP4, 80), 5, 0)]


@given(
    steps=hs.lists(
        hs.tuples(hs.integers(0, 50), hs.integers(0, 40_000), hs.integers(0, 50), hs.integers(0, 40_000)),
        max_size=12,
    )
)
def test_reported_payload_never_goes_down_and_adds_up_to_the_largest_computation(
    steps: list[tuple[int, int, int, int]],
) -> None:
    tally = ByteTally(sizes=SIZES)
    tally.start({})
    now = Totals()
    tx = rx = best_tx = best_rx = 0
    for packets_o, size_o, packets_r, size_r in steps:
        now = Totals(
            now.packets_orig + packets_o,
            now.bytes_orig + size_o,
            now.packets_reply + packets_r,
            now.bytes_reply + size_r,
        )
        for _key, d_tx, d_rx in tally.update({KEY: now}):
            assert d_tx >= 0 and d_rx >= 0
            tx, rx = tx + d_tx, rx + d_rx
        if now.packets_orig:  # bytes without a packet: nothing to count
            best_tx = max(best_tx, now.bytes_orig - now.packets_orig * SIZES.data)
        if now.packets_reply:
            best_rx = max(best_rx, now.bytes_reply - now.packets_reply * SIZES.data)
    assert (tx, rx) == (best_tx, best_rx)


def test_counted_bytes_go_to_the_scopes_of_their_mark_and_vip() -> None:
    acc, _pool, stats, _ = _acc()
    acc.bytes_from_counters = True
    acc.add_bytes((0x100, VIP4, 80), 1000, 20_000)
    acc.add_bytes((0x100, VIP4, 80), 1, 2)
    for scope in (stats.total, stats.frontend("front"), stats.backend("b"), stats.server("b", "web1")):
        assert (scope.bytes_tx, scope.bytes_rx) == (1001, 20_002)
    assert stats.server("b", "web2").bytes_tx == 0
    acc.add_bytes((0x100, socket.inet_aton("10.9.9.9"), 80), 5, 5)  # a VIP no frontend has any more
    assert (stats.total.bytes_tx, stats.frontend("front").bytes_tx) == (1006, 1001)
    acc.add_bytes((0x900, VIP4, 80), 7, 8)  # a mark naming no server
    assert acc.unattributed_bytes == 15 and acc.section()["unattributed_bytes"] == 15
    # a removed server whose pool forgot it at its last close: its mark still names it until released
    acc.server_of = {0x100: "b/web1", 0x300: "b/gone"}.get
    acc.add_bytes((0x300, VIP4, 80), 10, 20)
    assert (stats.server("b", "gone").bytes_rx, stats.frontend("front").bytes_rx) == (20, 20_002 + 20)


def test_a_system_without_nft_is_told_how_to_get_it(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG, "x.toml")

    def check(mode: Mode) -> None:
        offload_kernel.require_kernel(
            cfg, mode, proc=tmp_path, load=lambda _: None, loadable=lambda _: True, ctnetlink=None,
            nft_found=lambda: False,
        )  # fmt: skip

    with pytest.raises(OffloadUnavailable) as caught:
        check(Mode.PASSTHROUGH)
    assert "the nft tool" in str(caught.value) and "apt install nftables" in str(caught.value)
    check(Mode.DSR)  # DSR keeps no byte counters: nft is not needed there


def test_stats_read_the_counters_at_most_every_interval_and_a_reload_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from convey import stats as stats_mod
    from convey.dataplane import passthrough_offload_plane as plane_mod

    reads: list[int] = []
    totals = {KEY: Totals(1, 52 + 100, 0, 0)}

    def read() -> dict[tuple[int, bytes, int], Totals]:
        reads.append(1)
        if len(reads) == 4:
            raise byte_counters.RulesError("nft -j list set ip convey_bytes conns failed: No such file")
        return totals

    monkeypatch.setattr(plane_mod.byte_counters, "read", read)
    plane = plane_mod.PassthroughOffloadPlane({}, stats_mod.Stats(mode="passthrough", started=0.0))
    plane.tally = ByteTally(sizes=SIZES)
    plane.tally.start({})
    plane.refresh_bytes(force=False)
    plane.refresh_bytes(force=False)  # within BYTES_READ_INTERVAL: not read again
    assert len(reads) == 1
    plane.refresh_bytes()  # a reload, a drained server: at once
    assert len(reads) == 2
    plane._next_byte_read = 0.0
    plane.refresh_bytes(force=False)
    assert len(reads) == 3
    with caplog.at_level("INFO"):
        plane.refresh_bytes()
        plane.refresh_bytes()
    assert plane.byte_reads_failed == 1 and len(reads) == 5
    assert sum("byte_counters_read_failed" in r.getMessage() for r in caplog.records) == 1
    assert any("byte_counters_read_recovered" in r.getMessage() for r in caplog.records)
