"""Packaging and service files: license, dependencies and extras, entry points, samples as package data, the
systemd units, --help's exit codes and signals, `convey check`'s warnings."""

from __future__ import annotations

import fnmatch
import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from convey import cli
from convey.config import check_warnings, parse_config
from convey.modes import Mode

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_license() -> None:
    assert PROJECT["license"] == "MIT"  # an SPDX expression (PEP 639) ...
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77 for r in (
        PYPROJECT["build-system"]["requires"]))  # fmt: skip
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the convey developers" in text


def test_dependencies_and_extras() -> None:
    deps = PROJECT["dependencies"]
    assert "bottle>=0.12.25" in [d.split("#")[0].strip() for d in deps]  # 0.12.19-0.12.21 fail on 3.11
    assert "pyroute2" not in names(deps)
    extras = PROJECT["optional-dependencies"]
    assert "pyroute2" in names(extras["packet"]) and "pyroute2" in names(extras["backend"])
    assert names(extras["packet"]) | names(extras["backend"]) <= names(
        extras["test"]
    )  # the test extra is whole


BLOCK_PYROUTE2 = "import sys; sys.modules['pyroute2'] = None; "


def test_the_proxy_mode_and_check_need_no_pyroute2() -> None:
    code = BLOCK_PYROUTE2 + (
        "import convey.engine, convey.proxy.listeners, convey.web; from convey.cli import main; "
        "sys.exit(main(['check', '--config=convey/samples/sample-proxy.toml']) + "
        "main(['check', '-p', '--config=convey/samples/sample-passthrough.toml']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the block above works
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_PYROUTE2 + "import pyroute2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "pyroute2" in done.stderr


def test_entry_points() -> None:
    scripts = PROJECT["scripts"]
    assert scripts["convey"] == "convey.cli:main"
    module, _, name = scripts["convey-backend"].partition(":")
    assert module == "convey.backend.cli"
    assert callable(getattr(importlib.import_module(module), name))
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from convey.backend.cli import main; sys.exit(main(['--help']))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "install" in done.stdout
    wrapper = (ROOT / "scripts" / "setup-dsr-backend.sh").read_text()
    assert "-m convey.backend" in wrapper


def test_the_samples_are_package_data_kept_once() -> None:
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["convey"]
    samples = sorted((ROOT / "convey" / "samples").glob("*.toml"))
    assert {p.name for p in samples} >= {"sample-proxy.toml", "sample-passthrough.toml", "sample-dsr.toml"}
    for sample in samples:
        assert any(fnmatch.fnmatch(f"samples/{sample.name}", p) for p in patterns)
        parse_config(sample.read_text(), str(sample))
    link = ROOT / "samples"  # the checkout's samples/ is a link, not a second copy
    assert link.is_symlink() and link.resolve() == (ROOT / "convey" / "samples").resolve()


UNITS = ROOT / "contrib" / "systemd"


@pytest.mark.parametrize("unit", ["convey.service", "convey@.service"])
def test_the_systemd_units(unit: str, tmp_path: Path) -> None:
    text = (UNITS / unit).read_text()
    lines = {line.strip() for line in text.splitlines()}
    assert {"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=1"} <= lines
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    convey = Path(sys.executable).with_name("convey")
    name = "convey@web.service" if "@" in unit else unit
    (tmp_path / name).write_text(text.replace("/opt/convey/bin/convey", str(convey)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and name not in done.stderr, done.stderr


def test_help_lists_exit_codes_and_signals(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for code in (cli.EXIT_OK, cli.EXIT_CONFIG, cli.EXIT_STARTUP, cli.EXIT_INTERRUPTED):
        assert f"\n  {code} " in out
    assert "SIGTERM, SIGINT" in out and "SIGHUP" in out and "--log-format" in out


CONFIG = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "app"
idle_timeout = 30
[frontends.empty]
listen_addr = "198.18.0.1:81"
backend = "none"
[backends.app]
connect_timeout = 1
[backends.app.servers.one]
addr = "198.18.1.2:8080"
[backends.none]
servers = {}
[passthrough]
port_range = [40000, 41000]
fin_linger = 3
[dsr]
rewrite = "mac"
"""


def test_check_warnings() -> None:
    config = parse_config(CONFIG)
    empty = "frontend empty: backend none has no servers: clients are refused"
    assert check_warnings(config, Mode.PROXY) == [
        empty, "[passthrough] port_range, fin_linger: ignored in proxy mode", "[dsr] rewrite: ignored in proxy mode"
    ]  # fmt: skip
    dsr = check_warnings(config, Mode.DSR)
    assert dsr[:2] == [empty, "[passthrough] port_range: ignored in dsr mode"]  # DSR reads fin_linger
    assert "frontends.web: idle_timeout: proxy mode only, ignored in dsr" in dsr
    assert "backends.app.connect_timeout: proxy mode only, ignored in dsr mode" in dsr
    assert check_warnings(parse_config(CONFIG.split("[frontends.empty]")[0] + CONFIG.split('"none"')[1]),
                          Mode.PASSTHROUGH)[0].startswith("[dsr] rewrite")  # fmt: skip


def test_check_prints_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    assert cli.main(["check", f"--config={path}"]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "convey: warning: frontend empty: backend none has no servers" in err
