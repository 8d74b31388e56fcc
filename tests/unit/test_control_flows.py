"""GET /flows as plain functions: rows from a packet flow table, filters, limit, and "why this server"."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convey.balancing.pool import Pool
from convey.balancing.schedulers import flow_hash
from convey.config import parse_config
from convey.control.api import Control, Request, Sources
from convey.control.flows import FlowRow, Query, listing, merge, packet_select, select, stamp, unstamp, why
from convey.control.overlay import ApiError
from convey.packet.flow import FlowState
from convey.packet.flows import new_passthrough_flow


def pool(scheduler: str, weights: tuple[int, ...] = (1, 2, 3)) -> Pool:
    text = '[frontends.f]\nlisten_addr = "198.18.0.1:80"\nbackend = "b"\n'
    text += f'[backends.b]\nscheduler = "{scheduler}"\n'
    for i, w in enumerate(weights):
        text += f'[backends.b.servers.s{i}]\naddr = "198.19.0.{i + 1}:80"\nweight = {w}\n'
    return Pool(parse_config(text).backends["b"], "passthrough")


def row(
    client: str = "198.18.0.9", port: int = 40000, server: str = "b/s0", detail: int | None = 1
) -> FlowRow:
    return FlowRow(client, port, "198.18.0.1", 80, "f", server, "established", 1.25, 10, 20, detail)


@given(st.floats(0, 10**7), st.integers(0, 2**32 - 1))
def test_stamp_round_trips(now: float, detail: int) -> None:
    opened, got = unstamp(stamp(now, detail))
    assert got == detail and now - 0.1 < opened <= now + 1e-9


def test_wrr_why_names_the_turn_and_weights() -> None:
    p = pool("wrr")
    chosen = [p.pick().name for _ in range(7)]  # type: ignore[union-attr]
    assert p.pick_detail() == 7
    text = why(p, row(server=f"b/{chosen[-1]}", detail=7))
    weight = {"s0": 1, "s1": 2, "s2": 3}[chosen[-1]]
    assert text == f"wrr turn 7 (weight {weight} of 6)"


def test_a_proxy_fallback_says_so() -> None:
    assert (
        why(pool("wrr"), row(server="b/s1", detail=-1)) == "wrr: fallback 1 after the pick failed to connect"
    )


def test_least_conn_why_names_the_open_count() -> None:
    p = pool("least_conn", (1, 1))
    p.acquire(p.servers["s0"])
    p.acquire(p.servers["s0"])
    picked = p.pick()
    assert picked is not None and picked.name == "s1" and p.pick_detail() == 0
    p.acquire(picked)
    assert p.pick() is not None and p.pick_detail() == 1
    assert why(p, row(server="b/s1", detail=0)) == "least_conn: 0 open (fewest for weight 1)"


MAGLEV = pool("maglev")  # built once: a 65537-slot table takes a while


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2**32 - 1), st.integers(1024, 65535))
def test_maglev_why_recomputes_the_slot_of_the_pick(client: int, port: int) -> None:
    p = MAGLEV
    addr = socket.inet_ntoa(client.to_bytes(4, "big"))
    hashed = flow_hash(client, port, int.from_bytes(socket.inet_aton("198.18.0.1"), "big"), 80)
    server = p.pick(hashed)
    assert server is not None
    text = why(p, row(addr, port, f"b/{server.name}", None))
    assert text == f"maglev slot {hashed % 65537} of 65537 for hash 0x{hashed:016x}"
    other = next(n for n in p.servers if n != server.name)
    assert why(p, row(addr, port, f"b/{other}", None)).endswith(f"(the table now gives {server.name})")


def test_packet_rows_from_a_flow_table() -> None:
    def inet(a: str) -> bytes:
        return socket.inet_aton(a)

    flow = new_passthrough_flow(
        "f", inet("198.18.0.9"), 40000, inet("198.18.0.1"), 80, "b/s1", inet("198.19.0.2"), 80,
        inet("198.18.0.1"), 33999, 100.0,
    )  # fmt: skip
    flow.pick = stamp(100.0, 4)
    flow.count = 1500 + (2 << 48) + ((7000 + (3 << 48)) << 80)
    flow.state = FlowState.ESTABLISHED
    (got,), total = packet_select([flow], 103.5, Query())
    assert total == 1
    assert got == FlowRow(
        "198.18.0.9", 40000, "198.18.0.1", 80, "f", "b/s1", "established", 3.5, 1500, 7000, 4
    )
    del flow.pick  # a flow opened before the plane recorded picks
    assert packet_select([flow], 103.5, Query())[0][0].detail is None


def test_listing_filters_limits_and_counts() -> None:
    pools = {"b": pool("wrr")}
    rows = [row(f"198.18.0.{i}", 40000 + i, f"b/s{i % 3}") for i in range(10)]
    doc = listing(select(rows, Query(limit=3)), pools)
    assert (doc["total"], doc["shown"], len(doc["flows"])) == (10, 3, 3)
    first = doc["flows"][0]
    assert set(first) == {"client", "frontend", "server", "state", "age", "bytes_in", "bytes_out", "why"}
    assert first["client"] == "198.18.0.0:40000" and first["age"] == round(1.25, 1)
    assert first["why"] == "wrr turn 1 (weight 1 of 6)"
    for query, total in CASES:
        assert select(rows, query)[1] == total, query
    assert merge([select(rows, Query(limit=4)), select(rows[:2], Query(limit=4))], 5) == (
        rows[:4] + rows[:1],
        12,
    )


CASES = [
    (Query(server="b/s1"), 3),
    (Query(server="s1"), 3),
    (Query(server="b"), 10),
    (Query(server="x/s1"), 0),
    (Query(client="198.18.0.4"), 1),
    (Query(client="198.18.0.4:40004"), 1),
    (Query(client="198.18.0.4:1"), 0),
    (Query(client="not an address"), 0),
    (Query(frontend="f", server="s2", client="198.18.0.5"), 1),
    (Query(frontend="g"), 0),
    (Query(), 10),
]


def test_the_packet_table_filter_agrees_with_the_rows() -> None:
    """packet_select matches raw flow fields; it must select what matching the rows would."""

    def inet(a: str) -> bytes:
        return socket.inet_aton(a)

    flows = [
        new_passthrough_flow(
            "f", inet(f"198.18.0.{i}"), 40000 + i, inet("198.18.0.1"), 80, f"b/s{i % 3}", inet("198.19.0.2"), 80,
            inet("198.18.0.1"), 33000 + i, 100.0,
        )
        for i in range(10)
    ]  # fmt: skip
    every = packet_select(flows, 101.0, Query(limit=100))[0]
    assert len(every) == 10
    for query, total in CASES:
        assert packet_select(flows, 101.0, query) == select(every, query) and select(every, query)[1] == total
    assert packet_select(flows, 101.0, Query(server="s1", limit=2)) == (every[1:5:3], 3)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"sort": "1"}, "sort"),
    ],
)
def test_bad_query_parameters_are_400(params: dict[str, str], field: str) -> None:
    with pytest.raises(ApiError) as info:
        Query.parse(params)
    assert info.value.status == 400 and info.value.field == field


def test_flows_route() -> None:
    p = pool("wrr")
    rows = [row(), row(server="b/s2")]
    config: Any = parse_config('[frontends.f]\nlisten_addr = "198.18.0.1:80"\nbackend = "b"\n'
                               '[backends.b.servers.s0]\naddr = "198.19.0.1:80"')  # fmt: skip
    control = Control(Sources("passthrough", lambda: {"b": p}, lambda: config, lambda q: select(rows, q)))
    status, doc = control.handle(Request("GET", "/flows", {"server": "s2"}))
    assert status == 200 and doc["total"] == 1 and doc["flows"][0]["server"] == "b/s2"
    assert control.handle(Request("GET", "/flows", {"limit": "-1"})).status == 400
