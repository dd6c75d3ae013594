"""The viewer bundle: the static app beside this file copied into a run folder with the run's data beside it
as a script, so `viewer/index.html` opens straight from disk (file://), no server needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

APP = Path(__file__).resolve().parent
APP_FILES = ("index.html", "app.js", "style.css")


def write_bundle(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    out = run_dir / "viewer"
    out.mkdir(exist_ok=True)
    for name in APP_FILES:
        shutil.copyfile(APP / name, out / name)
    patch = next((run_dir / n for n in ("patch.diff", "patch.rejected.diff") if (run_dir / n).is_file()), None)
    data = {
        "run": json.loads((run_dir / "run.json").read_text(encoding="utf-8")),
        "summary": _json(run_dir / "summary.json"),
        "patch": patch.read_text(encoding="utf-8", errors="replace") if patch else None,
        "plots": sorted(str(p.relative_to(run_dir)) for p in (run_dir / "plots").glob("*.png"))
        if (run_dir / "plots").is_dir() else [],
    }
    # JSON is valid JavaScript; "</" is escaped so the data can never close a script element.
    text = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    (out / "data.js").write_text(f"window.RLM_DATA = {text};\n", encoding="utf-8")
    return [f"viewer/{name}" for name in (*APP_FILES, "data.js")]


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
