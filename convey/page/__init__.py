"""The live page at ``/``: one self-contained HTML document (no CDN, no external file) whose script fetches
``/stats`` every 1.5 s and updates the numbers in place, and drives the runtime API when a token is configured.

What it shows (docs/operations.md): totals with rates (connections/s, bytes/s and bit/s from two successive
snapshots, in k/M/G units), frontends, servers with their state in colour, and every other /stats section
(``packet``, ``dsr``, ``offload``, ``proxy``, ``workers``, ...) as tables, never as raw JSON. The first snapshot is
embedded so the page is complete before the first fetch. Every name from the config reaches the DOM through
``textContent``: the script never builds HTML from data. Its URLs are relative (``stats``, ``api/...``), so the page
also works behind a reverse proxy that serves it under a path prefix.
"""

from __future__ import annotations

import html
import json
from typing import Any

from convey.page.script import SCRIPT
from convey.page.style import STYLE

__all__ = ["REFRESH_MS", "render_page"]

REFRESH_MS = 1500


def render_page(doc: dict[str, Any]) -> str:
    """The page, with ``doc`` (a /stats document) as its first snapshot."""
    mode = html.escape(str(doc.get("mode", "")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>convey ({mode} mode)</title>
<style>{STYLE}</style></head>
<body data-refresh="{REFRESH_MS}">
<header><h1 id="title">convey ({mode} mode)</h1>
<p id="status" class="status"><span id="live" class="dot"></span> <span id="status-text">starting</span></p></header>
<section id="summary" class="cards" aria-label="totals"></section>
<section><h2>Frontends</h2><div class="scroll"><table id="frontends"></table></div></section>
<section><h2>Servers</h2>
<div id="api" class="api" hidden>
<p id="api-note" class="note"></p>
<form id="token-form" autocomplete="off"><label for="token">API token</label>
<input id="token" type="password" size="16"><button type="submit">use token</button></form>
<p id="api-message" class="note" role="status"></p></div>
<div class="scroll"><table id="servers"></table></div></section>
<div id="sections"></div>
<footer><a href="stats">/stats</a> &middot; <a href="metrics">/metrics</a></footer>
<noscript><p>This page needs JavaScript to show numbers: see <a href="stats">/stats</a>.</p></noscript>
<script id="initial" type="application/json">{_script_json(doc)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def _script_json(doc: dict[str, Any]) -> str:
    """JSON safe inside a <script> element: no ``</script>`` or ``<!--`` can end or confuse it."""
    text = json.dumps(doc, sort_keys=True, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
