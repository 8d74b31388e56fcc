"""Small helpers of the config reader: key paths, TOML-quoted names, digits, values shown in messages (pure)."""

from __future__ import annotations

import math
import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def quoted(name: str) -> str:
    """``name`` as a TOML key: bare when it can be, else quoted with control characters escaped."""
    if _BARE_KEY.fullmatch(name):
        return name
    text = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return f'"{escaped}"'


def digits(text: str) -> int | None:
    """``text`` as a number when it is 1-10 ASCII digits (str.isdigit() also takes "²" and other scripts)."""
    if 0 < len(text) <= 10 and text.isascii() and text.isdigit():
        return int(text)
    return None


def show(value: Any, limit: int = 40) -> str:
    """A value for a message: repr for strings, digits for numbers, cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"a {len(str(abs(value)))}-digit number" if abs(value) < 10**4000 else "a huge number"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))
