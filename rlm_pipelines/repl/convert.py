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


class Unconvertible(TypeError):
    """A value with no JSON form; the message names where in the value it is and its type."""


def jsonable(value: Any, where: str = "the value", records: bool = False) -> Any:
    """`value` as JSON data. `records`: namedtuples become dicts of their fields (dspy does so for tool
    results); otherwise they are tuples like any other and become lists (as dspy does for inputs)."""
    try:
        return _convert(value, where, records)
    except RecursionError:
        raise Unconvertible(f"{where} is nested too deeply or contains itself") from None


def _convert(value: Any, where: str, records: bool) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        return {_key(k, where): _convert(v, f"{where}[{k!r}]", records) for k, v in value.items()}
    if isinstance(value, tuple) and records and hasattr(value, "_asdict") and hasattr(value, "_fields"):
        return _convert(value._asdict(), where, records)
    if isinstance(value, (list, tuple)):
        return [_convert(v, f"{where}[{i}]", records) for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_convert(v, f"an item of {where}", records) for v in value]
        try:
            items.sort()
        except TypeError:  # mixed or unorderable items keep the set's order
            pass
        return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert(dataclasses.asdict(value), where, records)
    return _convert(_pydantic(value, where), where, records)


def _key(key: Any, where: str) -> Any:
    if isinstance(key, _SCALARS):  # JSON writes int, float, bool and None keys as strings
        return key
    raise Unconvertible(f"{where} has a key of type {type(key).__name__} ({_short(key)}): only str, int, "
                        f"float, bool and None keys can enter the sandbox")


def _pydantic(value: Any, where: str) -> Any:
    """Pydantic models, and what pydantic knows how to write as JSON (datetime, Enum, UUID, Decimal, Path)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticSerializationError, to_jsonable_python

    try:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return to_jsonable_python(value)
    except PydanticSerializationError as exc:
        raise Unconvertible(f"{where} is a {type(value).__name__} ({_short(value)}), which has no JSON form: "
                            f"{str(exc).splitlines()[0]}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
