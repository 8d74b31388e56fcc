"""Conntrack records and the ledger that turns them into opens, closes and payload bytes (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from convey.dataplane.conntrack_records import (
    ONE_WAY_CLOSED_STATES,
    Accounted,
    Change,
    Closed,
    CtKind,
    CtRecord,
    FlowTuple,
    HeaderSizes,
    Ledger,
    MarkFilter,
    Opened,
    TcpState,
    payload_bytes,
)

OURS = MarkFilter(mask=0xFF00)


def flow(n: int) -> FlowTuple:
    return FlowTuple("198.18.0.2", "198.18.0.1", 30000 + n, 80)


def rec(
    kind: CtKind,
    n: int,
    state: TcpState | None = None,
    mark: int = 0x100,
    counters: tuple[int, int, int, int] | None = None,
) -> CtRecord:
    orig = flow(n)
    reply = FlowTuple("198.18.1.2", "198.18.1.1", 8080, 30000 + n)
    c: tuple[int | None, ...] = counters if counters is not None else (None, None, None, None)
    return CtRecord(kind, 1000 + n, orig.key, reply.key, mark, 0, state, *c)


def kinds(changes: list[Change]) -> list[str]:
    return [type(c).__name__ for c in changes]


def test_flow_tuple_key_round_trip() -> None:
    t = FlowTuple("198.18.0.2", "198.19.0.100", 65535, 1)
    assert len(t.key) == 12 and FlowTuple.from_key(t.key) == t
    assert str(t) == "198.18.0.2:65535->198.19.0.100:1"


def test_payload_from_ip_bytes_measured_upload() -> None:
    # passthrough offload, a 20,000,013-byte upload: 377 skbs (GSO), 20,019,625 IP bytes (timestamps on)
    assert payload_bytes(377, 20_019_625, HeaderSizes()) == 20_000_013
    assert payload_bytes(0, 0, HeaderSizes()) == 0
    assert payload_bytes(3, 100, HeaderSizes()) == 0  # never negative


def test_header_sizes_from_the_syn() -> None:
    with_ts = HeaderSizes.from_syn(ip_header_len=20, tcp_header_len=40, timestamps=True)
    assert with_ts == HeaderSizes(data=52, first=60) == HeaderSizes()
    without = HeaderSizes.from_syn(ip_header_len=20, tcp_header_len=32, timestamps=False)
    assert without == HeaderSizes(data=40, first=52)
    # 10 data packets of 100 bytes and a SYN without timestamps
    assert payload_bytes(11, 10 * 140 + 52, without) == 1000


def test_mark_filter() -> None:
    assert OURS(0x100) and OURS(0x1FF) and not OURS(0x0) and not OURS(0x10000)
    exact = MarkFilter(mask=0x80000000, value=0x80000000)
    assert exact(0x80000123) and not exact(0x123)
    assert MarkFilter(mask=0xFF, value=0)(0x100)  # a value of 0 matches marks without those bits


def test_lifecycle_of_one_connection() -> None:
    ledger = Ledger(ours=OURS)
    opened = ledger.apply(rec(CtKind.NEW, 1, TcpState.SYN_SENT))
    assert opened == [Opened(1001, 0x100, flow(1).key, rec(CtKind.NEW, 1).reply_key)]
    assert opened[0].orig == flow(1) and opened[0].reply.src == "198.18.1.2"
    assert ledger.apply(rec(CtKind.NEW, 1, TcpState.SYN_SENT)) == []  # a repeat changes nothing
    assert ledger.apply(rec(CtKind.UPDATE, 1, TcpState.ESTABLISHED)) == []
    closed = ledger.apply(rec(CtKind.UPDATE, 1, TcpState.TIME_WAIT))
    assert closed == [Closed(1001, 0x100, flow(1).key)] and closed[0].orig == flow(1)
    assert ledger.open == {}
    final = ledger.apply(rec(CtKind.DESTROY, 1, TcpState.TIME_WAIT, counters=(6, 337, 5, 20_300)))
    assert final == [Accounted(1001, 0x100, flow(1).key, tx=337 - 6 * 52 - 8, rx=20_300 - 5 * 52 - 8)]


def test_not_ours_is_ignored() -> None:
    ledger = Ledger(ours=OURS)
    assert ledger.apply(rec(CtKind.NEW, 1, mark=0)) == []
    assert ledger.apply(rec(CtKind.DESTROY, 1, mark=0x10000, counters=(9, 9999, 9, 9999))) == []


def test_events_missed_before_the_close() -> None:
    ledger = Ledger(ours=OURS)
    # NEW lost: an update with an open state opens it; a status/mark update (no TCP state) does not
    assert ledger.apply(rec(CtKind.UPDATE, 2, None)) == []
    assert kinds(ledger.apply(rec(CtKind.UPDATE, 2, TcpState.ESTABLISHED))) == ["Opened"]
    # a DESTROY of a connection never seen: its bytes count, it was never open here
    assert kinds(ledger.apply(rec(CtKind.DESTROY, 3, TcpState.CLOSE, counters=(4, 400, 4, 400)))) == [
        "Accounted"
    ]
    # an entry destroyed while still open (RST, timeout, flush) closes and accounts at once
    assert kinds(ledger.apply(rec(CtKind.DESTROY, 2, TcpState.ESTABLISHED, counters=(5, 500, 5, 500)))) == [
        "Closed",
        "Accounted",
    ]


def test_one_way_closed_states_for_dsr() -> None:
    ledger = Ledger(ours=OURS, closed_states=ONE_WAY_CLOSED_STATES)
    ledger.apply(rec(CtKind.NEW, 1, TcpState.ESTABLISHED))
    assert kinds(ledger.apply(rec(CtKind.UPDATE, 1, TcpState.FIN_WAIT))) == ["Closed"]


def test_resync_opens_closes_and_does_not_count_bytes_twice() -> None:
    ledger = Ledger(ours=OURS)
    ledger.apply(rec(CtKind.NEW, 1))  # will be found closed
    ledger.apply(rec(CtKind.NEW, 2))  # will be gone (its DESTROY lost)
    ledger.apply(rec(CtKind.NEW, 3))  # still open
    dump = [
        rec(CtKind.DUMP, 1, TcpState.TIME_WAIT, counters=(10, 1528, 10, 1528)),
        rec(CtKind.DUMP, 3, TcpState.ESTABLISHED, counters=(10, 1528, 10, 1528)),
        rec(CtKind.DUMP, 4, TcpState.ESTABLISHED, counters=(10, 1528, 10, 1528)),  # opened while deaf
        rec(CtKind.DUMP, 5, TcpState.ESTABLISHED, mark=0),  # not ours
    ]
    changes, report = ledger.resync(dump)
    assert (report.entries, report.opened, report.closed, report.lost) == (3, 1, 2, 1)
    assert sorted(c.ct_id for c in changes if isinstance(c, Closed)) == [1001, 1002]
    assert [c.ct_id for c in changes if isinstance(c, Closed) and c.lost] == [1002]
    assert [c.ct_id for c in changes if isinstance(c, Opened)] == [1004]
    partial = {c.ct_id: (c.tx, c.rx) for c in changes if isinstance(c, Accounted)}
    assert partial == {1001: (1000, 1000), 1003: (1000, 1000), 1004: (1000, 1000)}
    # the final DESTROY reports only what came after the dump
    final = ledger.apply(rec(CtKind.DESTROY, 3, TcpState.TIME_WAIT, counters=(20, 3048, 20, 5048)))
    assert [(c.tx, c.rx) for c in final if isinstance(c, Accounted)] == [(1000, 3000)]
    assert 1003 not in ledger.reported
    # a second dump of an unchanged entry reports nothing new
    again, _ = ledger.resync([rec(CtKind.DUMP, 4, TcpState.ESTABLISHED, counters=(10, 1528, 10, 1528))])
    assert not [c for c in again if isinstance(c, Accounted)]


def test_resync_counts_connections_that_opened_and_closed_unseen() -> None:
    ledger = Ledger(ours=OURS)
    ledger.apply(rec(CtKind.NEW, 1))
    ledger.apply(rec(CtKind.UPDATE, 1, TcpState.TIME_WAIT))  # seen closing: in TIME_WAIT for 120 s
    dump = [
        rec(CtKind.DUMP, 1, TcpState.TIME_WAIT, counters=(10, 1528, 10, 1528)),
        rec(CtKind.DUMP, 2, TcpState.TIME_WAIT, counters=(10, 1528, 10, 1528)),  # never seen
    ]
    changes, report = ledger.resync(dump)
    assert kinds([c for c in changes if c.ct_id == 1002]) == ["Opened", "Closed", "Accounted"]
    assert kinds([c for c in changes if c.ct_id == 1001]) == ["Accounted"]
    assert (report.opened, report.closed, report.lost) == (1, 1, 0)
    again, _ = ledger.resync(dump)  # nothing new the second time
    assert again == []
    assert ledger.apply(rec(CtKind.UPDATE, 2, TcpState.ESTABLISHED)) == []  # a closed entry does not reopen


def test_answers_after_the_destroy_change_nothing() -> None:
    ledger = Ledger(ours=OURS)
    ledger.apply(rec(CtKind.NEW, 1))
    ledger.apply(rec(CtKind.DESTROY, 1, TcpState.TIME_WAIT, counters=(10, 1528, 10, 1528)))
    assert ledger.apply(rec(CtKind.UPDATE, 1, TcpState.TIME_WAIT, counters=(9, 1476, 9, 1476))) == []
    assert ledger.closed == set() and ledger.reported == {}


events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5),  # connection
        st.sampled_from([CtKind.NEW, CtKind.UPDATE, CtKind.DESTROY, CtKind.DUMP]),
        st.sampled_from([None, *TcpState]),
        st.integers(min_value=0, max_value=50),  # packets each way so far
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(events)
def test_each_connection_opens_once_closes_once_and_bytes_add_up(
    stream: list[tuple[int, CtKind, TcpState | None, int]],
) -> None:
    ledger = Ledger(ours=OURS)
    is_open: dict[int, bool] = {}
    destroyed: set[int] = set()
    counted: dict[int, int] = {}
    last_counters: dict[int, int] = {}
    for n, kind, state, packets in stream:
        if n in destroyed:
            continue  # an id is not reused while our tests run
        if kind in (CtKind.DESTROY, CtKind.DUMP):
            packets = max(packets, last_counters.get(n, 0))  # the kernel's counters only grow
            last_counters[n] = packets
            counters: tuple[int, int, int, int] | None = (packets, packets * 152, packets, packets * 152)
        else:
            counters = None
        for change in ledger.apply(rec(kind, n, state, counters=counters)):
            if isinstance(change, Opened):
                assert not is_open.get(n), "opened twice"
                is_open[n] = True
            elif isinstance(change, Closed):
                assert is_open.get(n), "closed without being open"
                is_open[n] = False
            elif isinstance(change, Accounted):
                counted[n] = counted.get(n, 0) + change.tx
        if kind is CtKind.DESTROY:
            destroyed.add(n)
            assert not is_open.get(n)
            assert counted.get(n, 0) == payload_bytes(packets, packets * 152, HeaderSizes())
    assert set(ledger.open) == {1000 + n for n, o in is_open.items() if o}


def test_the_ledger_forgets_the_oldest_destroyed_ids_first() -> None:
    ledger = Ledger(ours=OURS, gone_max=3)
    for n in range(5):
        ledger.apply(rec(CtKind.NEW, n))
        ledger.apply(rec(CtKind.DESTROY, n))
    assert list(ledger.gone) == [1002, 1003, 1004]
    assert ledger.apply(rec(CtKind.UPDATE, 4, TcpState.TIME_WAIT)) == []  # a late word about a destroyed one
