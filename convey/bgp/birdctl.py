"""BIRD's control socket (what ``birdc`` speaks): one command in, its reply lines out; and the parses convey needs.

The protocol: on connect BIRD greets with ``0001 BIRD <version> ready.``. A reply is a run of lines ``CODE-text``
(more follows), `` text`` (continues the previous code) and ends with a line ``CODE text`` (a space after the
four digits). Codes 8000-9999 are errors. Every call opens its own connection: convey asks a few times a second at
most, and a connection never outlives a call (no state to resynchronise after BIRD restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from convey.errors import ConveyError

Reply = list[tuple[int, str]]

# Reply codes (BIRD's doc/reply_codes): the end of "configure" without an error
CONFIGURED = {
    3,
    4,
    18,
    19,
    20,
}  # reconfigured, in progress, confirmed, soft-reconfigured, ... (0003, 0004, ...)
PROTOCOL_LINE = 1002
ROUTE_LINE = 1007


class BirdError(ConveyError):
    """BIRD answered with an error code, or its control socket did not answer."""


@dataclass(frozen=True, slots=True)
class Protocol:
    """One line of ``show protocols``."""

    name: str
    proto: str  # BGP, Static, Device, ...
    state: str  # up, start, down, ...
    since: str
    info: str  # for BGP: Established, Active, Connect, Idle, OpenSent, ... then maybe a reason

    @property
    def bgp_state(self) -> str:
        return self.info.split(" ", 1)[0] if self.info else self.state


async def command(socket_path: str, text: str, timeout: float = 5.0) -> Reply:
    """Send one command; its reply as (code, text) pairs (a continuation line carries its code). Raises
    BirdError for an error code, OSError/TimeoutError when the socket does not answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_path), timeout)
    try:
        return await asyncio.wait_for(_exchange(reader, writer, text), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> Reply:
    await _read_reply(reader)  # the greeting
    writer.write(text.encode() + b"\n")
    await writer.drain()
    reply = await _read_reply(reader)
    for code, line in reply:
        if code >= 8000:
            raise BirdError(f"bird: {text!r}: {line.strip()}")
    return reply


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    reply: Reply = []
    code = 0
    while True:
        raw = await reader.readline()
        if not raw:
            raise BirdError("bird closed its control socket in the middle of a reply")
        line = raw.decode(errors="replace").rstrip("\n")
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            code = int(line[:4])
            reply.append((code, line[5:]))
            if line[4] == " ":
                return reply
        else:
            reply.append((code, line[1:] if line.startswith(" ") else line))


def parse_protocols(reply: Reply) -> dict[str, Protocol]:
    """``show protocols``: name -> Protocol."""
    result = {}
    for code, line in reply:
        if code != PROTOCOL_LINE:
            continue
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        name, proto, _table, state, since = fields[:5]
        result[name] = Protocol(name, proto, state, since, fields[5].strip() if len(fields) > 5 else "")
    return result


def parse_prefixes(reply: Reply) -> list[str]:
    """``show route ...``: the prefixes listed (``A.B.C.D/N``), in order, once each."""
    seen: dict[str, None] = {}
    for code, line in reply:
        if code != ROUTE_LINE or not line[:1].isdigit():
            continue
        prefix = line.split(None, 1)[0]
        if "/" in prefix:
            seen[prefix] = None
    return list(seen)
