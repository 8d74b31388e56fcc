"""Fixtures for the proxy relay tests: run a coroutine on the default asyncio loop and, when installed, on uvloop.

Every run installs an exception handler that records what reaches the loop's handler; a test fails if anything did
(the relay must handle ordinary network errors itself).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])

TEST_TIMEOUT = 25.0

Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if request.param == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        errors: list[dict[str, Any]] = []

        async def guarded() -> T:
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            # A hung test fails here (pytest-timeout's signal cannot interrupt uvloop waiting in epoll).
            async with asyncio.timeout(TEST_TIMEOUT):
                return await coro

        with asyncio.Runner(loop_factory=factory) as r:
            result = r.run(guarded())
        assert not errors, f"exceptions reached the loop's exception handler: {errors}"
        return result

    return runner
