"""The live page's HTML: self-contained, phone-ready, and safe with any name (the browser test runs it for real)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from convey.page import REFRESH_MS, render_page
from convey.page.script import SCRIPT

EVIL = "</script><script>alert(1)</script><!--<b>&amp;"


def doc(name: str = "web") -> dict[str, Any]:
    counters = dict.fromkeys(("total_connections", "current_connections", "bytes_tx", "bytes_rx"), 0)
    counters |= {"refused": 0, "failed": 0}
    return {
        "mode": "proxy",
        "uptime_seconds": 3.0,
        **counters,
        "reloads": 0,
        "reload_failures": 0,
        "reload_errors": 0,
        "last_reload_error": None,
        "frontends": {name: {"backend": name, **counters}},
        "backends": {},
        "health": {"local_errors": 0},
    }


def embedded(page: str) -> Any:
    match = re.search(r'<script id="initial" type="application/json">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_the_first_snapshot_is_embedded_and_the_page_refreshes_from_json() -> None:
    page = render_page(doc())
    assert embedded(page) == doc()
    assert "convey (proxy mode)" in page
    assert 'http-equiv="refresh"' not in page  # no full reload: the script fetches /stats
    assert 'fetch("stats"' in SCRIPT  # relative: works behind a path prefix too
    assert f'data-refresh="{REFRESH_MS}"' in page
    assert 1000 <= REFRESH_MS <= 2000


def test_phone_ready_and_self_contained() -> None:
    page = render_page(doc())
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)  # no CDN, nothing from outside
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and "<link" not in page


def test_a_name_with_markup_cannot_end_the_script_or_become_html() -> None:
    page = render_page(doc(EVIL) | {"mode": EVIL})
    assert embedded(page)["frontends"][EVIL]["backend"] == EVIL  # the data arrives intact
    assert page.count("</script>") == 2  # the JSON block's and the script's own end tags, nothing injected
    assert "<script>alert" not in page and "<!--<b>" not in page
    assert "<title>convey (&lt;/script&gt;" in page  # the server-rendered mode is escaped


def test_the_script_never_builds_html_from_data() -> None:
    assert "innerHTML" not in SCRIPT and "outerHTML" not in SCRIPT
    assert "insertAdjacentHTML" not in SCRIPT and "document.write" not in SCRIPT
    assert "eval(" not in SCRIPT
    assert "textContent" in SCRIPT


def test_the_script_drives_the_api_contract() -> None:
    assert '"api/backends"' in SCRIPT
    assert '"api/servers/" + encodeURIComponent(backend) + "/" + encodeURIComponent(server)' in SCRIPT
    assert '"Bearer " + token' in SCRIPT and "sessionStorage" in SCRIPT
    assert 'action === "weight" ? "PUT" : "POST"' in SCRIPT
    assert "r.status === 403" in SCRIPT and "r.status === 401" in SCRIPT


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (a syntax check only)")
def test_the_script_parses(tmp_path: Path) -> None:
    path = tmp_path / "page.js"
    path.write_text(SCRIPT)
    result = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
