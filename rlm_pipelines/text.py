"""Cutting long text to a size, the one way the host does it.

Head and tail are kept (the start says what the text is, the end is where errors and results usually
are) and a marker in the middle says how much was cut, so neither a model nor a person mistakes a cut
text for the whole. The REPL server inside the sandbox cuts cell output the same way with code of its own
(`repl/server.py` must stay stdlib-only and self-contained).
"""

from __future__ import annotations

import re
from typing import Any, Callable

_SURROGATE = re.compile("[\ud800-\udfff]")


def clip(text: str, limit: int, note: str = "") -> str:
    """`text` if it has at most `limit` characters; else its first and last characters, `limit` in all, with
    a marker between them saying how many were cut (and `note`, e.g. where the whole text is)."""
    if len(text) <= limit:
        return text
    head, tail = _halves(limit)
    detail = f"; {note}" if note else ""
    return f"{text[:head]}\n... [{len(text) - limit} characters cut{detail}] ...\n{text[len(text) - tail:]}"


def clip_bytes(data: bytes, limit: int) -> bytes:
    """`clip` for raw output that is not decoded yet (counted in bytes, so it is cut before decoding)."""
    if len(data) <= limit:
        return data
    head, tail = _halves(limit)
    return b"%s\n... [%d bytes cut] ...\n%s" % (data[:head], len(data) - limit, data[len(data) - tail:])


def _halves(limit: int) -> tuple[int, int]:
    """How much of the head and of the tail to keep (the head gets the odd one)."""
    limit = max(limit, 0)
    return limit - limit // 2, limit // 2


def safe_text(text: str) -> str:
    """`text` with every lone surrogate (valid in JSON and in a Python str, not encodable as UTF-8) replaced
    by U+FFFD, so model or sandbox text can always be written, printed and sent on."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def safe_data(value: Any) -> Any:
    """`safe_text` over every string (keys included) of JSON-like data: dicts, lists, tuples."""
    return map_strings(safe_text, value)


def map_strings(change: Callable[[str], str], value: Any) -> Any:
    """`value` with `change` applied to every string in it (keys included), through dicts, lists and tuples
    (tuples come back as lists, as JSON has them)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {map_strings(change, k): map_strings(change, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_strings(change, v) for v in value]
    return value
