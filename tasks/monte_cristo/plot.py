"""Fold name variants and plot each character's wealth across the book."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Okabe-Ito: distinguishable for colour-blind readers and in greyscale print.
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]


def fold_rows(rows: list[dict[str, Any]], characters: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Rows with every name variant mapped to its canonical name; rows for unlisted names dropped."""
    folded = []
    for row in rows:
        name = str(row.get("character", ""))
        canonical = next((key for key, variants in characters.items()
                          if name.lower() == key.lower() or any(v.lower() in name.lower() for v in variants)), None)
        try:
            chapter, wealth = int(row["chapter"]), int(row["wealth"])
        except (KeyError, TypeError, ValueError):
            continue
        if canonical and 1 <= wealth <= 10:
            folded.append({**row, "character": canonical, "chapter": chapter, "wealth": wealth})
    return folded


def series(rows: list[dict[str, Any]], name: str, n_chapters: int, window: int) -> dict[str, list[float]]:
    """A character's wealth per chapter (mean of its rows), carried over chapters without a mention, then
    smoothed by a centred moving average padded at the edges with the edge values."""
    import numpy as np

    by_chapter: dict[int, list[int]] = {}
    for row in rows:
        if row["character"] == name:
            by_chapter.setdefault(row["chapter"], []).append(row["wealth"])
    if not by_chapter:
        return {"chapters": [], "raw": [], "smoothed": []}
    chapters = list(range(min(by_chapter), n_chapters + 1))
    raw, last = [], None
    for chapter in chapters:
        if chapter in by_chapter:
            last = sum(by_chapter[chapter]) / len(by_chapter[chapter])
        raw.append(last)
    window = max(1, min(window, len(raw)))
    padded = np.pad(np.array(raw, dtype=float), (window // 2, window - 1 - window // 2), mode="edge")
    smoothed = np.convolve(padded, np.ones(window) / window, mode="valid")
    return {"chapters": chapters, "raw": raw, "smoothed": [round(float(v), 3) for v in smoothed]}


def plot_wealth(rows: list[dict[str, Any]], names: list[str], n_chapters: int, path: Path,
                window: int = 7, model: str = "") -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
    out = {}
    for i, name in enumerate(names):
        data = series(rows, name, n_chapters, window)
        out[name] = data
        if data["chapters"]:
            ax.plot(data["chapters"], data["smoothed"], color=COLOURS[i % len(COLOURS)], linewidth=2.4,
                    label=f"{name} ({len({r['chapter'] for r in rows if r['character'] == name})} chapters)")
    ax.set_xlim(1, n_chapters)
    ax.set_ylim(0.5, 10.5)
    ax.set_xlabel("Chapter")
    ax.set_ylabel("Wealth (1 destitute - 10 immensely rich)")
    ax.set_title("The Count of Monte Cristo: wealth of the main characters across the book\n"
                 f"{window}-chapter moving average" + (f" - model: {model}" if model else ""), fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", frameon=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return out
