"""Issue 11, point 18: an audit that ran out of budget is `partial`, never the baseline, and resolves nothing;
the nightly limits finish a repo of about 100 source files complete.

Real git repos, real sandboxes, the task's own scripted policy (a sub-agent per package, `git grep` checks);
the partial audit runs through the real CLI as a Prefect flow, so its artifacts are checked on a real server.
"""

import json

import pytest

from tests.conftest import PROJECT, api, cli, run_scripted
from tests.fixtures.todo_repo import git

# modules per package: 96 modules + 12 __init__.py, "about 100 source files"; the big packages' findings are
# longer than limits=small lets a parent see, the small ones' are not
MODULES = [2, 2, 2, 2, 2, 2, 2, 2, 20, 20, 20, 22]
FINDINGS = sum(MODULES) * 4  # each module: a TODO, a shell=True, a bare except, an eval


def build_big_repo(root):
    """A repo of len(MODULES) packages, each module with four findings the audit's checks see."""
    repo = root / "big"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    for p, modules in enumerate(MODULES):
        package = repo / f"pkg{p:02d}"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for m in range(modules):
            (package / f"mod{m}.py").write_text(
                f'"""Module {p}.{m}."""\nimport subprocess\n\n\n'
                f"def scale{m}(x):\n    # TODO: handle negative x in pkg{p:02d}.mod{m} and say which caller passed it\n"
                f"    return x * {m}\n\n\n"
                f"def run{m}(cmd):\n    try:\n        return subprocess.run(cmd, shell=True)\n"
                f"    except:\n        return None\n\n\n"
                f"def calc{m}(expr):\n    return eval(expr)\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "big")
    return repo


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory):
    return build_big_repo(tmp_path_factory.mktemp("big"))


def audit(run_dir, repo, *overrides):
    summary, tree = run_scripted(run_dir, "task=repo_audit", f"task.repo={repo}", *overrides)
    assert "raised" not in summary, summary
    return summary, json.loads((run_dir / "result.json").read_text())


def test_the_nightly_preset_audits_a_100_file_repo_completely(big_repo, tmp_path):
    runs = tmp_path / "outputs" / "runs" / "repo_audit" / "day"
    summary, result = audit(runs / "1", big_repo, "limits=nightly")
    assert summary["status"] == "ok", summary.get("partial")
    assert summary["partial"] is None
    assert len(result["findings"]) == FINDINGS
    assert summary["comparison"]["complete"] is True


def test_a_refused_audit_is_partial_and_resolves_nothing(big_repo, tmp_path, prefect_server):
    runs = tmp_path / "outputs" / "runs" / "repo_audit" / "day"
    complete, _ = audit(runs / "1-complete", big_repo, "limits=nightly")
    assert complete["status"] == "ok"

    # the nightly audit as it was scheduled before: limits=small, as a Prefect flow run through the CLI
    env = {**prefect_server["env"], "RLM_CACHE_DIR": str(tmp_path / "cache")}
    done = cli(["task=repo_audit", f"task.repo={big_repo}", "model=scripted", "limits=small",
                "orchestration.progress=false"], tmp_path, env=env)
    assert done.returncode == 3, done.stderr[-3000:]  # partial
    assert "partial: " in done.stderr and "sub-agents refused (limits.max_sandboxes reached)" in done.stderr
    partial_dir = next(d for d in runs.parent.glob("*/*") if d.parent.name != "day")
    summary = json.loads((partial_dir / "summary.json").read_text())
    assert summary["status"] == "partial"
    assert summary["partial"]["refused"]["max_sandboxes"] > 0
    found = json.loads((partial_dir / "result.json").read_text())["findings"]
    assert 0 < len(found) < FINDINGS
    comparison = summary["comparison"]
    assert comparison["against"] == str(runs / "1-complete")
    assert comparison["complete"] is False
    assert comparison["resolved"] == []  # not seen is not fixed
    assert len(comparison["not_compared"]) == FINDINGS - len(found)
    assert len(comparison["still_open"]) == len(found)

    url = prefect_server["url"]
    table = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["rlm-run-summary"]}}})
    assert any("sub-agents refused" in json.dumps(a) and summary["run_id"] in json.dumps(a) for a in table)
    compared = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["rlm-audit-comparison"]}}})
    assert any("not_compared" in json.dumps(a) and "this audit is partial" in json.dumps(a) for a in compared)

    # the next complete audit compares with the last complete one, never with the partial one
    later, _ = audit(runs / "3-complete", big_repo, "limits=nightly")
    assert later["status"] == "ok"
    assert later["comparison"]["against"] == str(runs / "1-complete")
    assert later["comparison"]["resolved"] == [] and later["comparison"]["new"] == []
    assert len(later["comparison"]["still_open"]) == FINDINGS


def test_a_comparison_from_a_partial_audit_never_resolves(tmp_path):
    """compare() itself: findings a partial audit did not see are not_compared; a complete one resolves."""
    from rlm_tasks.repo_audit import compare

    before = [{"file": "a.py", "kind": "todo", "evidence": "# TODO a"},
              {"file": "b.py", "kind": "eval", "evidence": "eval(x)"}]
    (tmp_path / "result.json").write_text(json.dumps({"findings": before}))
    partial = compare(before[:1], tmp_path, {"refused": {"max_sandboxes": 3}})
    assert partial["resolved"] == [] and partial["not_compared"] == before[1:]
    complete = compare(before[:1], tmp_path, None)
    assert complete["resolved"] == before[1:] and complete["not_compared"] == []


def test_the_nightly_schedule_runs_with_the_nightly_limits(monkeypatch):
    """`serve schedule=nightly` composes each repo's run with limits=nightly (not limits=small)."""
    import yaml

    from rlm_pipelines.orchestration.serve import deployments_config
    from rlm_pipelines.paths import conf_dir

    monkeypatch.chdir(PROJECT)  # the schedule's repo is `.`: this checkout
    _, plans = deployments_config(["schedule=nightly", "schedule.model_name=scripted"])
    nightly = yaml.safe_load((conf_dir() / "limits" / "nightly.yaml").read_text())
    assert plans and all({k: config["limits"][k] for k in nightly} == nightly for _, config in plans)
