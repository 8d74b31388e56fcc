"""Fixtures for tests that build real network namespaces (root only; skipped with the reason otherwise).

Every test under tests/netns/ gets the ``netns`` marker (registered in pyproject.toml), so ``make test-fast``
(``-m "not netns"``) leaves them out without a hand-kept list. The bed itself is the top-level ``testbed``
package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bed import Testbed
from testbed.namespaces import unusable_reason

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def routed_bed() -> Iterator[Testbed]:
    """A routed bed: client -- lb -- 2 servers, each on its own veth pair (see testbed/bed.py)."""
    bed = Testbed.create(kind="routed", servers=2)
    try:
        yield bed
    finally:
        bed.destroy()


@pytest.fixture
def l2_bed() -> Iterator[Testbed]:
    """An L2 bed: client, lb and 2 servers on one bridge (198.19.0.0/24, VIP 198.19.0.100 on the lb)."""
    bed = Testbed.create(kind="l2", servers=2)
    try:
        yield bed
    finally:
        bed.destroy()
