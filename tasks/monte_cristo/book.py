"""Getting The Count of Monte Cristo (Gutenberg #1184) and cutting it into its 117 chapters."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Optional

from rlm_pipelines.paths import cache_dir

GUTENBERG_URLS = (
    "https://www.gutenberg.org/cache/epub/1184/pg1184.txt",
    "https://www.gutenberg.org/files/1184/1184-0.txt",
)
HEADING = re.compile(r"^[ \t]*Chapter (\d+)\.[ \t]*(.*?)[ \t]*$", re.MULTILINE)
START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)


def load_text(source: Optional[str] = None, timeout_s: float = 60.0) -> str:
    """The book's text: from `source` (a local path) if given, else from the cache, else downloaded once
    from Project Gutenberg into the cache."""
    if source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task.source={source!r} is not a file; give the path of the Gutenberg "
                                    f"text (#1184), or leave task.source empty to download it")
        return path.read_text(encoding="utf-8-sig")
    cached = cache_dir() / "gutenberg-1184.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8-sig")
    errors = []
    for url in GUTENBERG_URLS:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                data = response.read()
            break
        except OSError as exc:
            errors.append(f"{url}: {exc}")
    else:
        raise ConnectionError("could not download the book (" + "; ".join(errors) + "); download "
                              "https://www.gutenberg.org/cache/epub/1184/pg1184.txt yourself and pass "
                              "task.source=<path>")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(cached)
    return data.decode("utf-8-sig")


def split_chapters(text: str) -> list[str]:
    """The chapters in order, each starting with its heading. The table of contents lists the same
    headings, so the body starts at the LAST "Chapter 1." heading; Gutenberg's licence text is dropped."""
    text = text.replace("\r\n", "\n")  # (the same string when there is none: files are read with newline=None)
    start, end = START.search(text), END.search(text)
    # positions instead of a slice: no second copy of the book in memory
    first, last = start.end() if start else 0, end.start() if end else len(text)
    headings = list(HEADING.finditer(text, first, last))
    firsts = [i for i, match in enumerate(headings) if match.group(1) == "1"]
    if not firsts:
        raise ValueError("no 'Chapter 1.' heading found: is this The Count of Monte Cristo (Gutenberg #1184)?")
    body = headings[firsts[-1]:]
    numbers = [int(match.group(1)) for match in body]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"chapter headings are out of order: {numbers[:10]}...")
    chapters = []
    for match, following in zip(body, body[1:] + [None]):
        chunk = text[match.start(): following.start() if following else last]
        chapters.append(re.sub(r"\n{3,}", "\n\n", chunk.strip()))
    return chapters
