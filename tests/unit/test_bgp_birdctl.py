"""BIRD's control socket protocol against a fake BIRD (a Unix socket replaying real 2.0.12 replies)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convey.bgp import birdctl

PROTOCOLS = (
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     21:15:20.031  \n"
    b" convey_vips Static     master4    up     21:15:20.031  \n"
    b" r1         BGP        ---        up     21:15:23.822  Established   \n"
    b" r2         BGP        ---        start  21:15:20.031  Active        Socket: Connection refused\n"
    b"0000 \n"
)
ROUTES = (
    b"1007-Table master4:\n"
    b" 198.18.50.1/32       blackhole [convey_vips 21:15:20.031] * (200)\n"
    b" 198.18.50.2/32       blackhole [convey_vips 21:15:20.031] * (200)\n"
    b"0000 \n"
)
ANSWERS = {
    b"show protocols": PROTOCOLS,
    b"show route export r1": ROUTES,
    b"configure": b"0002-Reading configuration from bird.conf\n0003 Reconfigured\n",
    b"show route export nosuch": b"9001 syntax error, unexpected CF_SYM_UNDEFINED\n",
}


async def fake_bird(path: Path) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0001 BIRD 2.0.12 ready.\n")
        line = (await reader.readline()).strip()
        writer.write(ANSWERS.get(line, b"0000 \n"))
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, str(path))


def run(path: Path, command: str) -> birdctl.Reply:
    async def go() -> birdctl.Reply:
        server = await fake_bird(path)
        try:
            return await birdctl.command(str(path), command, timeout=2)
        finally:
            server.close()

    return asyncio.run(go())


def test_show_protocols(tmp_path: Path) -> None:
    protocols = birdctl.parse_protocols(run(tmp_path / "s", "show protocols"))
    assert set(protocols) == {"device1", "convey_vips", "r1", "r2"}
    assert protocols["r1"].bgp_state == "Established"
    assert (protocols["r2"].state, protocols["r2"].bgp_state) == ("start", "Active")
    assert protocols["r2"].info == "Active        Socket: Connection refused"
    assert protocols["device1"].bgp_state == "up"  # no info: the protocol's state


def test_exported_routes(tmp_path: Path) -> None:
    assert birdctl.parse_prefixes(run(tmp_path / "s", "show route export r1")) == [
        "198.18.50.1/32",
        "198.18.50.2/32",
    ]
    assert birdctl.parse_prefixes([(0, "")]) == []


def test_configure_reply_codes(tmp_path: Path) -> None:
    reply = run(tmp_path / "s", "configure")
    assert [code for code, _ in reply] == [2, 3]
    assert any(code in birdctl.CONFIGURED for code, _ in reply)


def test_an_error_code_raises(tmp_path: Path) -> None:
    with pytest.raises(birdctl.BirdError, match="syntax error"):
        run(tmp_path / "s", "show route export nosuch")


def test_no_socket_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        asyncio.run(birdctl.command(str(tmp_path / "absent"), "show status", timeout=1))
