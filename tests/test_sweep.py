"""Hydra multirun sweeps: every combination runs; the sweep report compares them and lists failures."""

import csv
import json

from tests.conftest import cli


def test_a_sweep_compares_every_combination_and_lists_failures(tmp_path):
    done = cli(["-m", "task=needles", "model=scripted", "orchestration.prefect=false", "orchestration.progress=false",
                "limits.max_tokens=10,5000000", "task.docs_per_call=10,30"], tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # some jobs did not end ok: the sweep says so
    assert "sweep: 4 jobs, 2 failed" in done.stdout
    sweep_dir = next((tmp_path / "outputs" / "sweeps").glob("*/*"))
    report = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(report["jobs"]) == 4
    labels = sorted(j["label"] for j in report["jobs"])
    assert labels[0] == "limits.max_tokens=10 task.docs_per_call=10"
    ok = [j for j in report["jobs"] if j["status"] == "ok"]
    assert len(ok) == 2
    assert all(j["score"] == 1.0 for j in ok)  # the scripted policy counts exactly
    assert {f["status"] for f in report["failed"]} == {"budget_exceeded"}
    assert len(report["failed"]) == 2
    rows = list(csv.DictReader(open(sweep_dir / "sweep.csv")))
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"ok", "budget_exceeded"}
    assert (sweep_dir / "plots" / "sweep_comparison.png").stat().st_size > 10_000
    page = (sweep_dir / "viewer" / "index.html").read_text()
    for job in report["jobs"]:
        assert f"../{job['job']}/viewer/index.html" in page
        assert (sweep_dir / job["job"] / "viewer" / "index.html").is_file()


def test_the_needles_score_is_exact(tmp_path):
    from rlm_tasks.needles import NeedlesParams, generate, task

    params = NeedlesParams(seed=3, documents=20, needles=17)
    docs, truth = generate(params)
    assert generate(params) == (docs, truth)
    assert sum(truth.values()) == 17
    assert task.score({"counts": truth}, {}, params) == 1.0
    wrong = dict(truth, red=truth["red"] + 1)
    assert task.score({"counts": wrong}, {}, params) == 0.75
