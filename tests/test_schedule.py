"""Nightly audits against a real Prefect server: the deployments exist with their schedules, and runs
triggered on one complete and compare their findings with the previous audit."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT, api, api_get
from tests.fixtures.todo_repo import build, git


def wait_for(check, timeout=120, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def run_deployment(url, deployment_id):
    flow_run = api(url, f"/deployments/{deployment_id}/create_flow_run", {})

    def finished():
        state = api_get(url, f"/flow_runs/{flow_run['id']}")
        return state if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for(finished, timeout=180)
    assert state["state_type"] == "COMPLETED", state
    return state


def latest_summary(outputs: Path) -> dict:
    newest = max(outputs.glob("runs/repo_audit/*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())


def test_serve_takes_a_users_schedule_folder_and_names_its_own_override(tmp_path, monkeypatch):
    from rlm_pipelines.checks import UsageError
    from rlm_pipelines.orchestration.serve import deployments_config

    repo = build(tmp_path / "src")
    (tmp_path / "mine" / "schedule").mkdir(parents=True)
    (tmp_path / "mine" / "schedule" / "weekly.yaml").write_text(
        f"cron: '0 4 * * 1'\ntimezone: UTC\nmodel_name: gemini_flash\n"
        f"repos: [{{name: toy, repo: {repo['path']}, branch: main, task: repo_audit, overrides: []}}]\n")
    monkeypatch.chdir(tmp_path)
    schedule, plans = deployments_config(["--config-dir", "mine", "schedule=weekly", "schedule.model_name=scripted"])
    assert schedule.cron == "0 4 * * 1"
    assert [name for name, _ in plans] == ["repo_audit-toy"]
    assert plans[0][1]["orchestration"]["outputs_dir"] == str(tmp_path / "outputs")
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    with pytest.raises(UsageError, match="or choose schedule.model_name=scripted to run offline"):
        deployments_config(["--config-dir", "mine", "schedule=weekly"])


def test_nightly_audits_are_served_and_compare_with_the_last_one(prefect_server, tmp_path):
    repo = build(tmp_path / "src")
    env = {**os.environ, **prefect_server["env"], "PYTHONPATH": str(PROJECT), "RLM_CACHE_DIR": str(tmp_path / "cache"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "rlm_pipelines.serve", "schedule=nightly", "schedule.model_name=scripted",
         "schedule.cron=15 2 * * *", "schedule.timezone=Europe/Paris",
         f"schedule.repos=[{{name: toy, repo: {repo['path']}, branch: main, task: repo_audit, overrides: []}}]",
         "orchestration.progress=false"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        url = prefect_server["url"]
        found = wait_for(lambda: [d for d in api(url, "/deployments/filter", {}) if d["name"] == "repo_audit-toy"])
        deployment = found[0]
        schedule = deployment["schedules"][0]["schedule"]
        assert schedule["cron"] == "15 2 * * *"
        assert schedule["timezone"] == "Europe/Paris"

        run_deployment(url, deployment["id"])
        first = latest_summary(tmp_path / "outputs")
        assert first["status"] == "ok"
        assert first["comparison"]["against"] is None
        opened = len(first["comparison"]["new"])
        assert opened >= 5

        (repo["path"] / "gamma" / "calc.py").write_text("def evaluate(expr):\n    return int(expr)\n")
        git(repo["path"], "commit", "-qam", "fix gamma")
        time.sleep(1.1)  # a new run folder (they are named by the second)
        run_deployment(url, deployment["id"])
        second = latest_summary(tmp_path / "outputs")
        comparison = second["comparison"]
        assert comparison["against"]
        assert comparison["new"] == []
        assert {f["kind"] for f in comparison["resolved"]} == {"todo", "eval"}
        assert len(comparison["still_open"]) == opened - 2
        artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["rlm-audit-comparison"]}}})
        assert artifacts
    finally:
        os.killpg(server.pid, 9)
        server.wait()
