"""How N workers share one config: queues, ports, flow capacity and the steering of packets (pure, no I/O).

Worker ``i`` (0-based) of ``n``:

- binds NFQUEUE ``queue_num + i``;
- passthrough: owns slice ``i`` of ``port_range`` (contiguous, sizes differ by at most one) and slice ``i`` of
  ``connection_tracker_capacity``, so two workers never hand out the same ephemeral port and the servers'
  replies can be steered to the owner by destination port alone (``--dport LO_i:HI_i``);
- gets the client -> VIP packets whose client port falls in its *buckets*: bits 1.. of the source port
  (``(sport >> 1) & (B - 1)``, ``B`` a power of two >= 16 and >= n) split into n contiguous ranges. Every packet
  of a connection carries the same client port, so a connection stays in one queue. Bit 0 is skipped because
  Linux clients pick even ports for ``connect()`` (``__inet_hash_connect``) and the bucket would never change.
  The kernel's own ``--queue-balance`` hashes addresses only (``nf_queue.h`` ``hash_v4``): every connection of
  one client address would land in one queue, so it is not used.

The matches are xt_u32 programs, written in the form ``iptables-save`` prints them back (the rule checks compare
text): ``0x0>>0x16&0x3c@0x0>>0x10&0x1e=0x0:0xe`` reads the TCP source port of an IPv4 packet and tests its
bucket bits. ICMP errors are steered by the TCP header they quote (see :func:`icmp_steer_matches`).
"""

from __future__ import annotations

from dataclasses import replace

from convey.config import Config
from convey.modes import Mode

TCP_SPORT = "0x0>>0x16&0x3c@0x0>>0x10"  # the TCP source port (IHL skips the IP header)
QUOTED = "0x0>>0x16&0x3c@0x8>>0x16&0x3c@"  # into an ICMP error's quoted IP header, past its IHL
QUOTED_SPORT = QUOTED + "0x8>>0x10"  # the quoted TCP header's source port
QUOTED_DPORT = QUOTED + "0x8"  # its destination port (low 16 bits of the word)


def buckets(count: int) -> int:
    """How many port buckets ``count`` workers split: a power of two, at least 16 and at least ``count``."""
    size = 16
    while size < count:
        size *= 2
    return size


def even_slices(lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """``lo..hi`` (inclusive) in ``count`` contiguous slices whose sizes differ by at most one."""
    total = hi - lo + 1
    base, extra = divmod(total, count)
    out = []
    start = lo
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size - 1))
        start += size
    return out


def capacity_share(capacity: int, index: int, count: int) -> int:
    base, extra = divmod(capacity, count)
    return base + (1 if index < extra else 0)


def _u32(program: str) -> str:
    return f'-m u32 --u32 "{program}"'


def _bucket_test(location: str, index: int, count: int) -> str:
    size = buckets(count)
    first, last = even_slices(0, size - 1, count)[index]
    mask = (size - 1) << 1
    return f"{location}&{mask:#x}={first << 1:#x}:{last << 1:#x}"


def client_steer_match(index: int, count: int) -> str:
    """The iptables match for worker ``index``'s client -> VIP packets (empty with one worker)."""
    if count == 1:
        return ""
    return _u32(_bucket_test(TCP_SPORT, index, count))


def return_port_ranges(config: Config, count: int) -> list[tuple[int, int]]:
    """Passthrough: each worker's slice of ``port_range``."""
    lo, hi = config.passthrough.port_range
    return even_slices(lo, hi, count)


def icmp_steer_matches(config: Config, mode: Mode, index: int, count: int) -> list[str]:
    """Matches sending an ICMP error to worker ``index``: one about a packet the worker sent to a server (the
    quoted source port is in its port slice; passthrough) and one about a packet sent to a client (the quoted
    destination port, the client's, is in its buckets). Empty with one worker: everything goes to one queue."""
    if count == 1:
        return [""]
    matches = [_u32(_bucket_test(QUOTED_DPORT, index, count))]
    if mode == Mode.PASSTHROUGH:
        lo, hi = return_port_ranges(config, count)[index]
        matches.insert(0, _u32(f"{QUOTED_SPORT}={lo:#x}:{hi:#x}"))
    return matches


def worker_config(config: Config, mode: Mode, index: int, count: int) -> Config:
    """The config worker ``index`` of ``count`` runs: its own queue, port slice and flow capacity (proxy: its
    share of each frontend's ``max_connections``), one worker."""
    if mode == Mode.PASSTHROUGH:
        pt = config.passthrough
        return replace(
            config,
            passthrough=replace(
                pt,
                workers=1,
                queue_num=pt.queue_num + index,
                port_range=return_port_ranges(config, count)[index],
                connection_tracker_capacity=capacity_share(pt.connection_tracker_capacity, index, count),
            ),
        )
    if mode == Mode.DSR:
        return replace(config, dsr=replace(config.dsr, workers=1, queue_num=config.dsr.queue_num + index))
    # proxy: each worker enforces its share of a frontend's max_connections (at least 1; 0 stays "no limit")
    frontends = {
        name: replace(f, max_connections=max(1, capacity_share(f.max_connections, index, count)))
        if f.max_connections
        else f
        for name, f in config.frontends.items()
    }
    return replace(config, frontends=frontends, proxy=replace(config.proxy, workers=1))
