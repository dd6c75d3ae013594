"""Issue 11, point 4: whatever the model does, run.json, result.json and the viewer's data.js stay bounded.

The attack as it was found: a hostile model (a real OpenAI-compatible HTTP server) whose code, with the
sandbox budget spent, calls rlm_query 5,000 times with 100 KB tasks and prints huge outputs, run through
the real CLI and a real sandbox. Before: a 504 MB run.json, a 503 MB data.js, 2.6 GB of host memory.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from rlm_pipelines.tree import SCHEMA_FILE
from tests.conftest import agents, run_dir_of
from tests.fakes.openai_server import OpenAIServer
from tests.fixtures.todo_repo import build

MB = 1024 * 1024
ATTACK = ("```python\n"
          "for i in range(5000):\n"
          "    rlm_query(str(i) + ' ' + 'x' * 100_000)\n"
          "print('y' * 30_000_000)\n"
          "FINAL({'report': 'r' * 3_000_000})\n"
          "```")


def run_cli_measured(args, cwd, env):
    """The CLI as a user runs it; returns (CompletedProcess-like tuple, its peak RSS in MB from VmHWM)."""
    process = subprocess.Popen([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:  # VmHWM only grows: the last reading before exit is the peak
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr, peak


@pytest.fixture
def repo(tmp_path):
    return build(tmp_path / "src")


def test_5000_refused_sub_agents_and_huge_outputs_leave_bounded_records(repo, tmp_path):
    def reply(request):
        return ATTACK if "[iteration 1/" in request["messages"][-1]["content"] else "```python\nFINAL('x')\n```"

    env = {**os.environ, "RLM_TEST_KEY": "k", "RLM_CACHE_DIR": str(tmp_path / "cache")}
    with OpenAIServer(reply=reply) as server:
        code, _, stderr, peak_mb = run_cli_measured(
            ["task=repo_audit", f"task.repo={repo['path']}", "model=local", f"model.api_base={server.url}",
             "model.api_key_env=RLM_TEST_KEY", "orchestration.prefect=false", "orchestration.progress=false",
             "limits.max_sandboxes=1", "limits.max_record_mb=1", "sandbox.repl.cell_timeout_s=300",
             "limits.wall_time_s=600"], tmp_path, env)
    run_dir = run_dir_of(tmp_path)
    sizes = {name: (run_dir / name).stat().st_size for name in ("run.json", "result.json", "viewer/data.js")}
    print(f"peak RSS of the CLI: {peak_mb} MB; sizes: {sizes}")
    assert code == 3, stderr[-3000:]  # partial
    assert all(size <= 1 * MB for size in sizes.values()), sizes
    assert peak_mb < 600

    run = json.loads((run_dir / "run.json").read_text())
    jsonschema.validate(run, json.loads(SCHEMA_FILE.read_text()))
    assert run["status"] == "partial"
    root = run["root"]
    assert root["refused"]["count"] == 5000
    assert root["refused"]["reasons"] == {"max_sandboxes": 5000}
    assert len([a for a in agents(root, 1) if a["status"] == "budget_exceeded"]) <= 20
    assert run["partial"]["refused"] == {"max_sandboxes": 5000}
    assert run["partial"]["result_cut"] is True
    assert run["partial"]["record_cut"]["bytes"] > 1 * MB
    assert "5,000 sub-agents refused" in run["partial"]["note"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "partial"
    assert summary["partial"]["refused"] == {"max_sandboxes": 5000}
    assert "partial: 5,000 sub-agents refused (limits.max_sandboxes reached)" in stderr
    data = (run_dir / "viewer" / "data.js").read_text()
    assert json.loads(data[len("window.RLM_DATA = "):].rstrip().rstrip(";"))["run"]["status"] == "partial"


def test_every_text_in_the_tree_is_clipped_and_refusals_are_counted(tmp_path):
    """The tree itself, driven directly: a refusal adds no node past the sample; any text field is cut."""
    from rlm_pipelines.tree import REFUSED_KEPT, TEXT_LIMIT, RunTree

    tree = RunTree(tmp_path / "run.json", {"task": "t", "engine": "repo", "model": "m"}, max_record_mb=1)
    root = tree.add_node("agent", "t" * (3 * TEXT_LIMIT))
    for i in range(1000):
        tree.refuse(root, f"{i} " + "x" * 10_000, "max_sandboxes", "[refused]")
    tree.update_node(root, sandbox_id="s" * (2 * TEXT_LIMIT))
    tree.add_iteration(root, prompt="p" * 10**6, response="r" * 10**6, code="c" * 10**6, stdout="o" * 10**6,
                       stderr="e" * 10**6, error="x" * 10**6, duration_s=0.1)
    tree.end_node(root, "ok", result="z" * 10**6, error="w" * 10**6)
    node = tree.run["root"]
    assert len(node["children"]) == REFUSED_KEPT
    assert node["refused"] == {"count": 1000, "reasons": {"max_sandboxes": 1000}, "kept": REFUSED_KEPT}
    texts = [node["task"], node["sandbox_id"], node["result"], node["error"],
             *(v for v in node["iterations"][0].values() if isinstance(v, str))]
    assert all(len(t) <= TEXT_LIMIT + 200 for t in texts)
    assert "characters cut" in node["task"]
    tree.finish("ok")
    assert (tmp_path / "run.json").stat().st_size <= 1 * MB
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["record_cut"]["limit_mb"] == 1
    assert tree.partial_reasons()["record_cut"]
    jsonschema.validate(saved, json.loads(SCHEMA_FILE.read_text()))
