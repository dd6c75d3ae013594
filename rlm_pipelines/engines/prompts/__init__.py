"""Prompts live in files beside this one, so they can be read and changed without reading code."""

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def load(name: str) -> str:
    """The text of `<name>.md` in this folder, without its trailing newline."""
    return (Path(__file__).parent / f"{name}.md").read_text(encoding="utf-8").rstrip("\n")
