"""Passthrough offload's ledger: opens from convey's decisions, closes and bytes from conntrack (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from convey.dataplane.conntrack_records import (
    Accounted,
    Change,
    Closed,
    CtKind,
    CtRecord,
    FlowTuple,
    HeaderSizes,
    MarkFilter,
    Opened,
    TcpState,
    payload_bytes,
)
from convey.dataplane.decided_ledger import CHECK_AFTER, DecidedLedger
from convey.dataplane.rules.offload import CLOSE_BITS, CLOSE_ORIG, CLOSE_REPLY, RESET_SEEN

OURS = MarkFilter(mask=0xFF00)
SIZES = HeaderSizes()


def key(n: int) -> bytes:
    return FlowTuple("198.18.0.2", "198.18.0.1", 30000 + n, 80).key


def rec(
    kind: CtKind,
    n: int,
    state: TcpState | None = None,
    ct_id: int | None = None,
    mark: int = 0x100,
    counters: tuple[int, int, int, int] | None = None,
) -> CtRecord:
    reply = FlowTuple("198.18.1.2", "198.18.1.1", 8080, 40000 + n).key
    c: tuple[int | None, ...] = counters if counters is not None else (None, None, None, None)
    return CtRecord(kind, 1000 + n if ct_id is None else ct_id, key(n), reply, mark, 0, state, *c)


def ledger(now: float = 100.0) -> DecidedLedger:
    return DecidedLedger(ours=OURS, clock=lambda: now)


def kinds(changes: list[Change]) -> list[str]:
    return [type(c).__name__ for c in changes]


def counters_for(tx: int, rx: int, packets: int = 10) -> tuple[int, int, int, int]:
    """IP counters whose payload is ``tx`` and ``rx`` (``payload_bytes``'s inverse)."""
    extra = SIZES.first - SIZES.data
    return (packets, tx + packets * SIZES.data + extra, packets, rx + packets * SIZES.data + extra)


def test_a_decided_connection_opens_once_and_closes_at_time_wait_then_gets_its_bytes() -> None:
    led = ledger()
    opened = led.decided(key(1), 0x100, 1.0)
    assert kinds(opened) == ["Opened"] and led.decided(key(1), 0x100, 1.1) == []  # a retransmitted SYN
    uid = opened[0].ct_id
    assert led.apply(rec(CtKind.UPDATE, 1, TcpState.ESTABLISHED)) == []  # learns the id, nothing to say
    closed = led.apply(rec(CtKind.UPDATE, 1, TcpState.TIME_WAIT))
    assert closed == [Closed(uid, 0x100, key(1))] and not led.open
    answer = rec(CtKind.UPDATE, 1, TcpState.TIME_WAIT, counters=counters_for(300, 5000))
    assert led.apply(answer) == [Accounted(uid, 0x100, key(1), 300, 5000)]
    assert led.apply(answer) == []  # never twice
    assert led.apply(rec(CtKind.DESTROY, 1, TcpState.TIME_WAIT, counters=counters_for(300, 5000))) == []


def test_a_destroy_closes_with_its_counters_and_others_marks_are_ignored() -> None:
    led = ledger()
    uid = led.decided(key(2), 0x100, 1.0)[0].ct_id
    assert led.apply(rec(CtKind.DESTROY, 2, TcpState.SYN_SENT, mark=0x1)) == []  # not ours
    got = led.apply(rec(CtKind.DESTROY, 2, TcpState.SYN_SENT, counters=counters_for(0, 0, 1)))
    assert kinds(got) == ["Closed"] and got[0].ct_id == uid and not led.open


def test_the_previous_entry_destroyed_by_a_reopening_syn_does_not_close_the_new_connection() -> None:
    led = ledger()
    first = led.decided(key(3), 0x100, 1.0)[0].ct_id
    assert kinds(led.apply(rec(CtKind.UPDATE, 3, TcpState.TIME_WAIT))) == ["Closed"]
    second = led.decided(key(3), 0x200, 2.0)[0].ct_id  # the client reuses its port: the same tuple
    assert second != first
    # conntrack destroys the TIME_WAIT entry (same id: the kernel reuses it) as the new SYN comes in
    old = rec(CtKind.DESTROY, 3, TcpState.TIME_WAIT, counters=counters_for(10, 20))
    assert led.apply(old) == [Accounted(first, 0x100, key(3), 10, 20)]  # the first one's last bytes
    assert key(3) in led.open and led.open[key(3)].uid == second
    got = led.apply(rec(CtKind.UPDATE, 3, TcpState.CLOSE, mark=0x200))
    assert got == [Closed(second, 0x200, key(3))]


def test_a_syn_answered_with_a_reset_closes_by_its_destroy_and_a_reset_tuple_reopens_cleanly() -> None:
    led = ledger()
    first = led.decided(key(8), 0x100, 1.0)[0].ct_id
    # the server refused: conntrack kills the entry at once, in CLOSE, with no UPDATE before
    got = led.apply(rec(CtKind.DESTROY, 8, TcpState.CLOSE, counters=counters_for(0, 0, 1)))
    assert kinds(got) == ["Closed"] and got[0].ct_id == first and not led.open
    # an established connection reset: the UPDATE to CLOSE closes it; its entry lives on until its DESTROY
    second = led.decided(key(8), 0x100, 2.0)[0].ct_id
    assert led.apply(rec(CtKind.UPDATE, 8, TcpState.CLOSE)) == [Closed(second, 0x100, key(8))]
    third = led.decided(key(8), 0x100, 3.0)[0].ct_id  # the client reuses the tuple at once
    assert (
        led.apply(rec(CtKind.DESTROY, 8, TcpState.CLOSE, counters=counters_for(5, 5))) != []
    )  # second's bytes
    assert key(8) in led.open and led.open[key(8)].uid == third  # the reopened connection stays open


def test_the_close_bits_close_a_connection_in_any_state_and_a_later_time_wait_says_nothing() -> None:
    """An entry made at a SYN reports only its mark changes (the close bits ORed in at each FIN and at a RST)
    and its DESTROY: both bits are the close, one is half a close."""
    led = DecidedLedger(ours=OURS, closed_mark=CLOSE_BITS, clock=lambda: 100.0)
    uid = led.decided(key(12), 0x100, 1.0)[0].ct_id
    assert led.apply(rec(CtKind.UPDATE, 12, TcpState.FIN_WAIT, mark=0x100 | CLOSE_ORIG)) == []
    assert key(12) in led.open  # the server may still send
    closed = led.apply(rec(CtKind.UPDATE, 12, TcpState.LAST_ACK, mark=0x100 | CLOSE_BITS))
    assert closed == [Closed(uid, 0x100, key(12))] and key(12) not in led.open
    answer = rec(CtKind.UPDATE, 12, TcpState.LAST_ACK, mark=0x100 | CLOSE_BITS, counters=counters_for(10, 20))
    assert led.apply(answer) == [Accounted(uid, 0x100 | CLOSE_BITS, key(12), 10, 20)]
    # an entry picked up mid-stream reports every state: its TIME_WAIT after the bits closes nothing again
    assert led.apply(rec(CtKind.UPDATE, 12, TcpState.TIME_WAIT, mark=0x100 | CLOSE_BITS)) == []
    # a RST's bit: its event is a close when the RST took the entry to CLOSE (the event carries that state);
    # one off the exact sequence number left it ESTABLISHED and its event carries no state (a forged RST)
    reset = led.decided(key(13), 0x100, 2.0)[0].ct_id
    assert led.apply(rec(CtKind.UPDATE, 13, None, mark=0x100 | RESET_SEEN)) == []
    got = led.apply(rec(CtKind.UPDATE, 13, TcpState.CLOSE, mark=0x100 | RESET_SEEN))
    assert got == [Closed(reset, 0x100, key(13))] and key(13) in led.reset
    # the reply FIN alone is half a close too; without closed_mark the bits mean nothing
    led.decided(key(14), 0x100, 3.0)
    assert led.apply(rec(CtKind.UPDATE, 14, TcpState.CLOSE_WAIT, mark=0x100 | CLOSE_REPLY)) == []
    plain = ledger()
    plain.decided(key(14), 0x100, 3.0)
    assert plain.apply(rec(CtKind.UPDATE, 14, TcpState.LAST_ACK, mark=0x100 | CLOSE_BITS)) == []
    # a dump after a restart: an entry with both bits is closed, never adopted
    changes, report = led.resync(
        [
            rec(CtKind.DUMP, 14, TcpState.LAST_ACK, mark=0x100 | CLOSE_BITS, counters=counters_for(1, 2)),
            rec(CtKind.DUMP, 15, TcpState.LAST_ACK, mark=0x100 | CLOSE_BITS),
        ]
    )
    assert kinds(changes) == ["Closed", "Accounted"] and report.opened == 0 and not led.open


def test_unconfirmed_connections_are_checked_and_closed_when_conntrack_has_no_entry() -> None:
    led = ledger()
    led.decided(key(4), 0x100, 0.0)
    led.decided(key(5), 0x100, 0.0)
    led.decided(key(6), 0x100, 5.0)
    assert led.apply(rec(CtKind.UPDATE, 5, TcpState.ESTABLISHED, counters=counters_for(7, 9))) != []
    assert led.unconfirmed(CHECK_AFTER - 1) == []
    assert led.unconfirmed(CHECK_AFTER) == [key(4)]  # 5 is named, 6 is too young
    assert led.unconfirmed(CHECK_AFTER + 1) == []  # asked already
    led.decided(key(9), 0x100, 0.0)
    led.decided(key(10), 0x100, 0.0)
    assert len(led.unconfirmed(CHECK_AFTER + 100, limit=1)) == 1  # one per look: the other waits
    got = led.missing(key(4))
    assert kinds(got) == ["Closed"] and got[0].lost and led.unconfirmed_closed == 1
    assert led.missing(key(5)) == []  # conntrack named it: a missing answer means it closed, events say so


def test_a_check_answer_reports_the_bytes_so_far_and_the_close_the_rest() -> None:
    led = ledger()
    uid = led.decided(key(7), 0x100, 0.0)[0].ct_id
    live = rec(CtKind.UPDATE, 7, TcpState.ESTABLISHED, counters=counters_for(100, 1000))
    assert led.apply(live) == [Accounted(uid, 0x100, key(7), 100, 1000)]
    led.apply(rec(CtKind.UPDATE, 7, TcpState.TIME_WAIT))
    done = rec(CtKind.UPDATE, 7, TcpState.TIME_WAIT, counters=counters_for(150, 4000))
    assert led.apply(done) == [Accounted(uid, 0x100, key(7), 50, 3000)]


def test_resync_adopts_closes_and_forgives_the_youngest() -> None:
    led = ledger(now=100.0)
    kept = led.decided(key(1), 0x100, 50.0)[0].ct_id  # in the dump, open
    closed = led.decided(key(2), 0x100, 50.0)[0].ct_id  # in the dump, TIME_WAIT
    lost = led.decided(key(3), 0x100, 50.0)[0].ct_id  # not in the dump
    led.decided(key(4), 0x100, 99.5)  # not in the dump, decided just now: kept
    dump = [
        rec(CtKind.DUMP, 1, TcpState.ESTABLISHED, counters=counters_for(5, 6)),
        rec(CtKind.DUMP, 2, TcpState.TIME_WAIT, counters=counters_for(8, 9)),
        rec(CtKind.DUMP, 9, TcpState.ESTABLISHED),  # before our time: adopted
        rec(CtKind.DUMP, 10, TcpState.TIME_WAIT),  # closed before our time: nothing
        rec(CtKind.DUMP, 11, TcpState.ESTABLISHED, mark=0x1),  # not ours
    ]
    changes, report = led.resync(dump)
    assert Accounted(kept, 0x100, key(1), 5, 6) in changes
    assert Closed(closed, 0x100, key(2)) in changes and Accounted(closed, 0x100, key(2), 8, 9) in changes
    assert Closed(lost, 0x100, key(3), lost=True) in changes
    assert [c.orig_key for c in changes if isinstance(c, Opened)] == [key(9)]
    assert (report.entries, report.opened, report.closed, report.lost) == (4, 1, 2, 1)
    assert set(led.open) == {key(1), key(4), key(9)}


events = st.lists(
    st.tuples(
        st.sampled_from(
            ["decide", "established", "time_wait", "close", "destroy", "destroy_close", "answer", "missing"]
        ),
        st.integers(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_every_open_is_closed_at_most_once_and_bytes_never_repeat(script: list[tuple[str, int]]) -> None:
    """Whatever conntrack says in whatever order: one Opened and at most one Closed per connection, opened -
    closed = open, and each connection's reported bytes never exceed what its counters said."""
    led = ledger()
    opened: dict[int, int] = {}
    closed: dict[int, int] = {}
    bytes_of: dict[int, int] = {}
    for step, (what, n) in enumerate(script):
        if what == "decide":
            changes = led.decided(key(n), 0x100, float(step))
        elif what == "missing":
            changes = led.missing(key(n))
        else:
            state = {
                "established": TcpState.ESTABLISHED,
                "time_wait": TcpState.TIME_WAIT,
                "close": TcpState.CLOSE,
                "destroy": TcpState.TIME_WAIT,
                "destroy_close": TcpState.CLOSE,
                "answer": TcpState.TIME_WAIT,
            }[what]
            kind = CtKind.DESTROY if what.startswith("destroy") else CtKind.UPDATE
            counters = counters_for(1000, 1000) if what != "close" and what != "time_wait" else None
            if what == "established":
                counters = None
            changes = led.apply(rec(kind, n, state, counters=counters))
        for c in changes:
            if isinstance(c, Opened):
                opened[c.ct_id] = opened.get(c.ct_id, 0) + 1
            elif isinstance(c, Closed):
                closed[c.ct_id] = closed.get(c.ct_id, 0) + 1
            elif isinstance(c, Accounted):
                bytes_of[c.ct_id] = bytes_of.get(c.ct_id, 0) + c.tx
    assert all(v == 1 for v in opened.values()) and all(v == 1 for v in closed.values())
    assert set(closed) <= set(opened)
    assert len(opened) - len(closed) == len(led.open)
    assert all(total <= payload_bytes(10, counters_for(1000, 1000)[1], SIZES) for total in bytes_of.values())
