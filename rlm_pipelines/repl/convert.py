"""Host values made JSON-able before they cross into the sandbox, converted the way dspy's interpreters do.

Why: dspy users give RLM inputs that are pydantic models, sets or tuples, and tools that return models,
dataclasses or namedtuples; dspy's own interpreters convert these (pydantic -> `model_dump(mode="json")`,
sets -> sorted lists where the items sort, tuples -> lists, dates/enums/UUIDs as pydantic writes them in
JSON), so refusing them would break programs that run there. Only what has no JSON form at all (an open
file, a lock, a dict keyed by tuples, a structure that contains itself) is refused, with where and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_SCALARS = (str, int, float, bool, type(None))
_PLAIN = frozenset(_SCALARS)  # exactly these types (not subclasses) cross as they are


class Unconvertible(TypeError):
    """A value with no JSON form; the message names where in the value it is and its type."""


class _Refused(Exception):
    """Raised where a part has no JSON form; each container on the way out adds its key to `path`, so the
    location costs nothing unless something is refused."""

    def __init__(self, reason: str):
        self.reason = reason
        self.path: list[str] = []


def jsonable(value: Any, where: str = "the value", records: bool = False) -> Any:
    """`value` as JSON data. `records`: namedtuples become dicts of their fields (dspy does so for tool
    results); otherwise they are tuples like any other and become lists (as dspy does for inputs)."""
    try:
        return _convert(value, records)
    except RecursionError:
        raise Unconvertible(f"{where} is nested too deeply or contains itself") from None
    except _Refused as exc:
        raise Unconvertible(f"{where}{''.join(reversed(exc.path))} {exc.reason}") from None


def _convert(value: Any, records: bool) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = k if type(k) is str else _key(k)
            try:
                out[key] = v if type(v) in _PLAIN else _convert(v, records)
            except _Refused as exc:
                exc.path.append(f"[{_short(k)}]")
                raise
        return out
    if isinstance(value, tuple) and records and hasattr(value, "_asdict") and hasattr(value, "_fields"):
        return _convert(value._asdict(), records)
    if isinstance(value, (list, tuple)):
        return _items(value, records)
    if isinstance(value, (set, frozenset)):
        items = _items(value, records, where=" (an item)")
        try:
            items.sort()
        except TypeError:  # mixed or unorderable items keep the set's order
            pass
        return items
    if isinstance(value, _SCALARS):  # subclasses: IntEnum, str enums
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert(dataclasses.asdict(value), records)
    return _convert(_pydantic(value), records)


def _items(values: Any, records: bool, where: str = "") -> list:
    out = []
    for value in values:
        try:
            out.append(value if type(value) in _PLAIN else _convert(value, records))
        except _Refused as exc:
            exc.path.append(where or f"[{len(out)}]")
            raise
    return out


def _key(key: Any) -> Any:
    if isinstance(key, _SCALARS):  # JSON writes int, float, bool and None keys as strings
        return key
    raise _Refused(f"has a key of type {type(key).__name__} ({_short(key)}): only str, int, float, bool and "
                   f"None keys can enter the sandbox")


def _pydantic(value: Any) -> Any:
    """Pydantic models, and what pydantic knows how to write as JSON (datetime, Enum, UUID, Decimal, Path)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticSerializationError, to_jsonable_python

    try:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return to_jsonable_python(value)
    except PydanticSerializationError as exc:
        raise _Refused(f"is a {type(value).__name__} ({_short(value)}), which has no JSON form: "
                       f"{str(exc).splitlines()[0]}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
