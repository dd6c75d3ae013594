"""Fitting a record (run.json, result.json, the viewer's data) under a size, whatever a model made.

Texts are clipped (head + tail, `text.clip`) shorter and shorter, then long lists and objects are cut,
until the JSON fits: a record that is cut stays readable and says so, instead of growing with the model's
output (issue 11, point 4: 5,000 refused sub-agents once made a 504 MB run.json).
"""

from __future__ import annotations

import json
from typing import Any

from rlm_pipelines.text import clip

# (characters kept of each text, items kept of each list, keys kept of each object), gentlest first. Objects
# keep at least 40 keys so run-tree nodes and iterations keep every field they have.
_LEVELS = ((20_000, None, None), (2_000, None, None), (300, 200, None), (100, 20, 200), (40, 4, 40), (20, 0, 40))


def size(value: Any) -> int:
    """Bytes of `value` as the records write it (UTF-8 JSON)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace"))


def fit(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """(`value`, False) when its JSON has at most `max_bytes`; else (a smaller copy that does, True)."""
    if size(value) <= max_bytes:
        return value, False
    smaller = value
    for chars, items, keys in _LEVELS:
        smaller = shrink(value, chars, items, keys)
        if size(smaller) <= max_bytes:
            break
    return smaller, True


def shrink(value: Any, chars: int, items: Any = None, keys: Any = None) -> Any:
    """A copy of `value` with every text clipped to `chars`, lists to their first and last `items` items and
    objects to their first `keys` keys (None: no limit)."""
    if isinstance(value, str):
        return clip(value, chars, note="record size limit limits.max_record_mb")
    if isinstance(value, dict):
        kept = list(value.items())
        if keys is not None and len(kept) > keys:
            kept = kept[:keys] + [("...", f"[{len(kept) - keys} keys cut: limits.max_record_mb]")]
        return {k: shrink(v, chars, items, keys) for k, v in kept}
    if isinstance(value, (list, tuple)):
        if items is not None and len(value) > items:
            value = list(value[: items - items // 2]) + list(value[len(value) - items // 2:]) if items else []
        return [shrink(v, chars, items, keys) for v in value]
    return value
