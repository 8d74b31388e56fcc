"""The runtime API's routes on the stats service's bottle app: each request becomes a ``Request`` for
:class:`convey.control.api.Control`, each answer JSON with its status."""

from __future__ import annotations

import json
import logging

import bottle

from convey.control.api import MAX_BODY, Control, Request

__all__ = ["install_routes"]

log = logging.getLogger("convey.control")

_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]


def _request() -> Request:
    req = bottle.request
    length = req.content_length
    body = (
        b"" if length <= 0 else b"\0" * (MAX_BODY + 1) if length > MAX_BODY else req.body.read(MAX_BODY + 1)
    )
    params = {key: req.query.getunicode(key, default="") for key in req.query}
    return Request(
        req.method, req.path, params, req.get_header("Authorization"), body, req.remote_addr or "-"
    )


def install_routes(app: bottle.Bottle, control: Control) -> None:
    """``/api/...`` and ``/flows`` on ``app``."""

    def answer(path: str = "") -> str:
        bottle.response.content_type = "application/json"
        try:
            status, doc = control.handle(_request())
        except Exception as exc:  # the loop did not answer in time, or a bug: a 500, never a traceback page
            log.error("event=api_error path=%r error=%r", bottle.request.path[:200], exc)
            status, doc = 500, {"error": f"internal error: {type(exc).__name__}"}
        bottle.response.status = status
        return json.dumps(doc, indent=1, sort_keys=True)

    app.route("/api/<path:path>", method=_METHODS, callback=answer)
    app.route("/flows", method=_METHODS, callback=answer)
