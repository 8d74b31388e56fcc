"""Fixtures for the tier tests: a router running BIRD 2 with ECMP, balancers running convey with ``[bgp]``, DSR
servers (testbed/cluster.py). Root, namespaces and BIRD 2 (Debian ``bird2``) needed; skipped with the reason
otherwise.

Every test here gets the ``netns`` marker, as under tests/netns/, so ``make test-fast`` (``-m "not netns"``)
leaves them out and ``make test`` (all of tests/) runs them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.namespaces import unusable_reason

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True, scope="module")  # module: before the module-scoped tier is built
def _require_netns_and_bird() -> None:
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        pytest.skip("needs BIRD 2 (Debian package bird2: apt-get install bird2, or make deps)")
