"""Sequence checks of a passthrough flow: which RST may close it, which SYN may replace it (issue 10).

RFC 5961 section 3: an endpoint accepts a RST whose sequence number is exactly the next one it expects, answers
one elsewhere in its receive window with a challenge ACK, and ignores the rest; so anyone who knows a flow's
tuple but not its sequence numbers cannot close it, and the balancer must not either. A middlebox does not see
the exact window, so the check here is a conservative superset of it, kept without any per-packet work (the fast
path never sees a SYN, FIN or RST):

- each direction's sequence space starts at the sender's ISN + 1, learnt from its SYN (client) or SYN-ACK
  (server) and kept in the flow's head (``Flow.fwd_seq``, ``Flow.ret_seq``);
- the sender has sent at most ``base + payload bytes counted + 2`` (SYN and FIN each take one; retransmissions
  only make the count larger), and the receiver's window is at most ``65535 << its window scale`` (RFC 7323:
  scaling applies only when both SYNs offered it; before the SYN-ACK the window is unscaled);
- so a RST is in the window when ``0 <= seq - base <= bytes + 2 + max window`` (mod 2**32).

A RST from the server before its SYN-ACK (the server refuses the connection) carries no sequence number the
client could check; the client accepts it when it acknowledges the SYN (RFC 9293, SYN-SENT), and so does this
check. A flow whose server's SYN-ACK never passed (established by another packet) accepts every RST, as before. A RST outside the window is dropped and counted (``rst_out_of_window``): the endpoint would ignore it.

A SYN on a flow closed by FINs both ways (the client reuses its port during the linger) replaces it only when
its sequence number lies beyond everything the old connection sent, as the kernel accepts a SYN for a connection
in TIME_WAIT; any other SYN (a retransmission, a forged SYN, SYN|FIN, SYN|RST, any SYN on a flow a RST closed) is
forwarded without changing the flow (or, with RST, checked as a RST first). A RST in the window may be a lucky
forgery its endpoint ignores, so a flow a RST closed is ESTABLISHED again at the next packet that is neither
(``FlowTable.reopen``; the passthrough decision does it).
"""

from __future__ import annotations

from convey.packet.flows import NO_WSCALE, Flow, FlowState
from convey.packet.ipv4 import ACK, Parsed

__all__ = ["client_rst_in_window", "new_connection", "note_syn_ack", "server_rst_in_window", "wscale_of"]

_MOD = 1 << 32
_HALF = 1 << 31


def _in_window(base: int, sent: int, seq: int, wscale: int) -> bool:
    window = 65535 << (0 if wscale == NO_WSCALE else wscale)
    return (seq - base) % _MOD <= sent + 2 + window


def client_rst_in_window(flow: Flow, p: Parsed) -> bool:
    """A client -> server RST: in the server's receive window."""
    base, wscale = flow.fwd_seq
    return base is None or _in_window(base, flow.fwd_bytes, p.seq, wscale)


def server_rst_in_window(flow: Flow, p: Parsed) -> bool:
    """A server -> client RST: in the client's receive window; before the SYN-ACK, acknowledging the SYN."""
    base, wscale = flow.ret_seq
    if base is not None:
        return _in_window(base, flow.ret_bytes, p.seq, wscale)
    client_base = flow.fwd_seq.base
    if flow.state != FlowState.EMBRYONIC or client_base is None:
        return True  # established without a SYN-ACK seen (it was dropped): nothing to check against
    return bool(p.flags & ACK) and p.ack == client_base


def new_connection(flow: Flow, seq: int) -> bool:
    """Whether a SYN with sequence number ``seq`` on a closing flow starts a new connection."""
    base = flow.fwd_seq.base
    if base is None:
        return True
    ahead = (seq + 1 - base) % _MOD
    return flow.fwd_bytes + 2 < ahead < _HALF


def note_syn_ack(flow: Flow, buf: bytes | bytearray, p: Parsed) -> None:
    """The server's SYN-ACK: its ISN, and both window scales (used only if both SYNs offered one)."""
    if flow.state != FlowState.EMBRYONIC or flow.ret_seq.base is not None:
        return
    client_ws = flow.ret_seq.wscale
    server_ws = wscale_of(buf, p)
    if client_ws == NO_WSCALE or server_ws == NO_WSCALE:
        client_ws = server_ws = 0
    base = flow.fwd_seq.base
    flow.set_fwd_seq(base, server_ws)
    flow.set_ret_seq(p.seq + 1, client_ws)


def wscale_of(buf: bytes | bytearray, p: Parsed) -> int:
    """The window scale option of a SYN (0..14), or NO_WSCALE when it has none."""
    i, end = p.ihl + 20, p.ihl + p.tcp_header_len
    while i < end:
        kind = buf[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or buf[i + 1] < 2:
            break
        length = buf[i + 1]
        if kind == 3 and length == 3 and i + 2 < end:
            return min(buf[i + 2], 14)
        i += length
    return NO_WSCALE
