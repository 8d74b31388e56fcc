"""The speaker's process handling without a network: the missing binary names the package, a child started with
``die_with_parent`` dies when its parent is SIGKILLed, stale runtime directories of dead processes go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convey.bgp.speaker import RUNTIME_PREFIX, find_bird, remove_stale_runtime_dirs
from convey.errors import StartupError

ROOT = Path(__file__).resolve().parents[2]

# A parent that starts `sleep` bound to it, prints the child's pid, then waits to be killed.
PARENT = """
import os, subprocess, sys, time
from convey.bgp.speaker import die_with_parent
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent(os.getpid()))
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_missing_bird_names_the_package() -> None:
    with pytest.raises(StartupError, match=r"apt-get install bird2"):
        find_bird("/nonexistent/bird")


def test_child_dies_with_its_sigkilled_parent() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while alive(child):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.01)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


def test_stale_runtime_dirs_of_dead_processes_go(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{RUNTIME_PREFIX}{dead.pid}-abc"
    mine = tmp_path / f"{RUNTIME_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated"
    for path in (stale, mine, other):
        path.mkdir()
        (path / "bird.conf").write_text("")
    assert remove_stale_runtime_dirs(str(tmp_path)) == [str(stale)]
    assert mine.exists() and other.exists() and not stale.exists()
