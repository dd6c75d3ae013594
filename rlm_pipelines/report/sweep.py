"""At the end of a Hydra multirun: `sweep.json`, `sweep.csv`, comparison plots and a sweep page that links
every job's viewer. Failed jobs are listed, not hidden."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

FIGURES = ("score", "cost_usd", "tokens", "wall_time_s", "agents", "max_depth")
COLUMNS = ("job", "label", "status", *FIGURES, "llm_calls", "iterations", "error", "run_dir")


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report = write_sweep_report(Path(config.hydra.sweep.dir))
        print(f"sweep: {len(report['jobs'])} jobs, {len(report['failed'])} failed -> {config.hydra.sweep.dir}/"
              f"viewer/index.html")


def _jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = list(OmegaConf.load(overrides_file))
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {
            "status": "failed", "error": "no summary.json: the job failed before its run started (see its log)"}
        jobs.append({"job": job_dir.name, "overrides": overrides, **summary})
    varying = {o.split("=", 1)[0] for job in jobs for o in job["overrides"]
               if len({x for j in jobs for x in j["overrides"] if x.split("=", 1)[0] == o.split("=", 1)[0]}) > 1}
    for job in jobs:
        job["label"] = " ".join(o for o in job["overrides"] if o.split("=", 1)[0] in varying) or job["job"]
    return jobs


def _why_partial(job: dict[str, Any]) -> Any:
    """A `partial` job has no error: its summary's `partial.note` says what was refused or cut."""
    partial = job.get("partial")
    return partial.get("note") if isinstance(partial, dict) else None


def write_sweep_report(sweep_dir: Path) -> dict[str, Any]:
    jobs = _jobs(sweep_dir)
    failed = [{"job": j["job"], "label": j["label"], "status": j["status"], "error": j.get("error") or _why_partial(j)}
              for j in jobs if j["status"] != "ok"]
    report = {"sweep_dir": str(sweep_dir), "jobs": jobs, "failed": failed}
    (sweep_dir / "sweep.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    with open(sweep_dir / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(jobs)
    if jobs:
        _plot(jobs, sweep_dir / "plots" / "sweep_comparison.png")
    _page(report, sweep_dir / "viewer" / "index.html")
    return report


def _plot(jobs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=110)
    labels = [j["label"] for j in jobs]
    for ax, figure in zip(axes.flat, FIGURES):
        values = [float(j.get(figure) or 0) for j in jobs]
        colours = ["#0072B2" if j["status"] == "ok" else "#D55E00" for j in jobs]
        ax.bar(range(len(jobs)), values, color=colours)
        ax.set_title(figure.replace("_", " "))
        ax.set_xticks(range(len(jobs)), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Sweep: each job's figures (orange: not ok)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _page(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"<tr class='{html.escape(j['status'])}'><td><a href='../{html.escape(j['job'])}/viewer/index.html'>"
        f"{html.escape(j['label'])}</a></td><td>{html.escape(j['status'])}</td>"
        + "".join(f"<td>{html.escape(str(j.get(f, '')))}</td>" for f in FIGURES)
        + f"<td>{html.escape(str(j.get('error') or ''))[:200]}</td></tr>" for j in report["jobs"])
    head = "".join(f"<th>{f}</th>" for f in ("job", "status", *FIGURES, "error"))
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>rlm-pipelines sweep</title>"
        "<style>body{font:14px system-ui;margin:20px}td,th{padding:4px 10px;text-align:left}"
        "tr.ok td:nth-child(2){color:#2e7d32}tr:not(.ok) td:nth-child(2){color:#c62828;font-weight:700}"
        "img{max-width:100%}</style>"
        f"<h1>Sweep {html.escape(report['sweep_dir'])}</h1><p>{len(report['jobs'])} jobs, "
        f"{len(report['failed'])} not ok</p><table id='jobs'><tr>{head}</tr>{rows}</table>"
        "<img src='../plots/sweep_comparison.png' alt='sweep comparison'>", encoding="utf-8")
