"""The runtime API's bearer token: what a valid one looks like, reading it from a file, checking a request's.

Sans-I/O but for ``read_token`` (one small file, read when the config is loaded). The token never appears in a
log line or an error message.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MAX_TOKEN", "MIN_TOKEN", "authorized", "read_token", "stats_token", "token_problem"]

MIN_TOKEN, MAX_TOKEN = 16, 4096  # characters


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a token, or None."""
    if (
        not MIN_TOKEN <= len(token) <= MAX_TOKEN
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        return f"the token must be {MIN_TOKEN}-{MAX_TOKEN} printable ASCII characters without spaces"
    return None


def read_token(path: str) -> str:
    """The token in a file: its text without surrounding whitespace (a trailing newline is fine). OSError (a
    UnicodeDecodeError or a path with a NUL byte as one too) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read(MAX_TOKEN + 2).strip()
    except (UnicodeDecodeError, ValueError) as exc:
        raise OSError(f"not a token file: {exc}") from None


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (``Bearer <token>``), compared in constant time."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode())


def stats_token(
    section: Mapping[str, Any], fail: Callable[[str, str], Exception]
) -> tuple[str | None, str | None]:
    """``[stats] api_token`` or ``api_token_file`` (read now): (the token, the file), or ``fail(key, problem)``
    raised."""
    if "api_token" in section and "api_token_file" in section:
        raise fail("stats.api_token_file", "set api_token or api_token_file, not both")
    name = "api_token_file" if "api_token_file" in section else "api_token"
    if name not in section:
        return None, None
    key, value = f"stats.{name}", section[name]
    if not isinstance(value, str):
        raise fail(key, f"must be a string, got {type(value).__name__}")
    path = value if name == "api_token_file" else None
    try:
        token = read_token(value) if path is not None else value
    except OSError as exc:
        raise fail(key, f"cannot read {value[:200]!r}: {exc.strerror or exc}") from None
    problem = token_problem(token)
    if problem:
        raise fail(key, problem)
    return token, path
