"""The viewer bundle: the static app beside this file copied into a run folder with the run's data beside it
as a script, so `viewer/index.html` opens straight from disk (file://), no server needed.

data.js stays under the run's `limits.max_record_mb` like run.json: the patch is read head and tail only,
and the whole is fitted (`records.fit`) when the run, summary and patch together would exceed it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlm_pipelines.records import fit

APP = Path(__file__).resolve().parent
APP_FILES = ("index.html", "app.js", "style.css")
PATCH_CHARS = 2_000_000  # of a patch shown in the viewer (the whole one is in the run folder)


def write_bundle(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    out = run_dir / "viewer"
    out.mkdir(exist_ok=True)
    for name in APP_FILES:
        shutil.copyfile(APP / name, out / name)
    patch = next((run_dir / n for n in ("patch.diff", "patch.rejected.diff") if (run_dir / n).is_file()), None)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    data = {
        "run": run,
        "summary": _json(run_dir / "summary.json"),
        "patch": _head_and_tail(patch, PATCH_CHARS) if patch else None,
        "plots": sorted(str(p.relative_to(run_dir)) for p in (run_dir / "plots").glob("*.png"))
        if (run_dir / "plots").is_dir() else [],
    }
    data, _ = fit(data, _limit_bytes(run))
    # JSON is valid JavaScript; "</" is escaped so the data can never close a script element.
    text = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    (out / "data.js").write_text(f"window.RLM_DATA = {text};\n", encoding="utf-8")
    return [f"viewer/{name}" for name in (*APP_FILES, "data.js")]


def _limit_bytes(run: dict) -> int:
    """The run's limits.max_record_mb in bytes (20 MB for a record that does not say)."""
    try:
        return int(float((run.get("limits") or {}).get("max_record_mb") or 20) * 1024 * 1024)
    except (TypeError, ValueError, AttributeError):
        return 20 * 1024 * 1024


def _head_and_tail(path: Path, chars: int) -> str:
    """A text file's head and tail, `chars` in all, with a marker like `text.clip`'s; reads no more than that."""
    with path.open("rb") as f:
        f.seek(0, 2)
        total = f.tell()
        if total <= chars:
            f.seek(0)
            return f.read().decode("utf-8", "replace")
        f.seek(0)
        head = f.read(chars // 2).decode("utf-8", "replace")
        f.seek(total - chars // 2)
        tail = f.read().decode("utf-8", "replace")
    return f"{head}\n... [{total - chars // 2 * 2:,} bytes cut; the whole patch is in {path.name}] ...\n{tail}"


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
