"""The repo engine with real git, real sandboxes, scripted and local-HTTP models."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlm_pipelines.engines.repo import _bounded
from rlm_pipelines.models.scripted import DepthScript, Turn, register_script
from tests.fakes.openai_server import OpenAIServer
from tests.fixtures.todo_repo import TODOS, build
from tests.conftest import agents, repl_server_processes, run_dir_of, run_scripted, still_running


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("repo"))


def run(tmp_path, *overrides):
    """A scripted repo run in-process: (summary, run.json, run folder)."""
    summary, tree = run_scripted(tmp_path / "run", *overrides)
    return summary, tree, tmp_path / "run"


def test_depth_two_tree_fixes_a_todo_with_a_patch_that_applies(repo, tmp_path):
    summary, tree, run_dir = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}",
                                 f"task.patch_out={tmp_path / 'out.diff'}")
    assert summary["status"] == "ok", tree["error"]
    root = tree["root"]
    assert len(agents(root, 1)) == 3
    assert len(agents(root, 2)) == TODOS  # a package each, a TODO each
    assert summary["agents"] == 1 + 3 + TODOS
    assert summary["max_depth"] == 2
    # the ids of the children an iteration spawned are recorded with it
    assert sorted(root["iterations"][1]["children"]) == sorted(c["id"] for c in root["children"])
    assert all(len(c["iterations"][1]["children"]) == len(c["children"]) for c in root["children"])
    result = json.loads((run_dir / "result.json").read_text())  # FINAL_VAR('report'): the dict itself
    assert len(result["todos"]) == TODOS
    assert result["easiest"]["todo"] == "# TODO: validate inputs"
    patch = (run_dir / "patch.diff").read_bytes()
    assert b"+    # DONE: validate inputs" in patch
    assert (tmp_path / "out.diff").read_bytes() == patch
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(repo["path"]), str(fresh)], check=True)
    subprocess.run(["git", "apply", "--check", str(run_dir / "patch.diff")], cwd=fresh, check=True)
    assert tree["usage"]["sandboxes"] == 1 + 3 + TODOS
    assert tree["commit"] == repo["head"]


def test_children_check_out_the_requested_commit_and_branch(repo, tmp_path):
    _, tree, _ = run(tmp_path / "a", "task=repo_todos", f"task.repo={repo['path']}", f"task.commit={repo['first']}")
    children = agents(tree["root"], 1) + agents(tree["root"], 2)
    assert children
    assert all(repo["first"] in c["iterations"][0]["stdout"] for c in children)
    assert "packages: ['alpha', 'beta']" in tree["root"]["iterations"][0]["stdout"]  # no gamma yet
    _, tree, _ = run(tmp_path / "b", "task=repo_todos", f"task.repo={repo['path']}", "task.branch=feature")
    assert all(repo["feature"] in c["iterations"][0]["stdout"] for c in agents(tree["root"], 1))
    assert f"{TODOS + 1} TODOs" in tree["root"]["iterations"][0]["stdout"]


def test_limits_reach_the_model_and_the_tree(repo, tmp_path):
    summary, tree, _ = run(tmp_path / "a", "task=repo_todos", f"task.repo={repo['path']}",
                           "limits.max_sandboxes=3")
    refused = [a for a in agents(tree["root"]) if a["status"] == "budget_exceeded"]
    # over the run's lifetime: the root and two package agents; the third package and every TODO refused
    assert len(refused) == 1 + len([a for a in agents(tree["root"], 2)])
    assert tree["usage"]["sandboxes"] == 3
    assert all("max_sandboxes" in a["error"] for a in refused)
    # the model is told, in its own output ...
    assert "sandbox budget limits.max_sandboxes=3 is spent" in tree["root"]["iterations"][1]["stdout"]
    # ... and works around it: the package agents judged their TODOs in place; refused agents make it partial
    assert summary["status"] == "partial"
    assert summary["partial"]["refused"] == {"max_sandboxes": len(refused)}
    assert any("judged in place" in (a["result"] or "") for a in agents(tree["root"], 1))
    summary, tree, _ = run(tmp_path / "b", "task=repo_todos", f"task.repo={repo['path']}", "limits.max_depth=1")
    assert summary["status"] == "partial"
    assert list(summary["partial"]["refused"]) == ["max_depth"]
    assert agents(tree["root"], 2) == []
    assert all("depth limit" in json.dumps(a["result"]) for a in agents(tree["root"], 1))


@pytest.mark.parametrize("override,message", [("task.repo=/no/such/repo", "cannot clone task.repo"),
                                              ("task.commit=0123456789abcdef", "task.commit='0123456789abcdef' is not in")])
def test_a_bad_repo_or_commit_fails_clearly_and_leaks_nothing(repo, tmp_path, override, message):
    repo_arg = f"task.repo={repo['path']}" if "commit" in override else override
    summary, tree, _ = run(tmp_path, "task=repo_todos", repo_arg, override)
    assert summary["status"] == "error"
    assert message in tree["error"]
    assert tree["status"] == "error"
    assert tree["usage"]["sandboxes"] == 0
    assert repl_server_processes(os.getpid()) == []  # none started by this test process (in-process run)


def test_global_timeout_stops_a_long_cell(repo, tmp_path):
    register_script("stuck", DepthScript({0: [Turn("import time\ntime.sleep(120)")]}))
    started = time.monotonic()
    summary, tree, _ = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}", "model.model=scripted/stuck",
                           "limits.wall_time_s=3")
    assert summary["status"] == "timeout"
    assert "wall time" in tree["error"]
    assert time.monotonic() - started < 30
    assert tree["root"]["status"] == "timeout"


def test_global_timeout_stops_a_slow_model_call(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_TEST_KEY", "k")
    with OpenAIServer(reply=lambda r: "```python\nprint(1)\n```", latency_s=20) as server:
        started = time.monotonic()
        summary, tree, _ = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}", "model=local",
                               f"model.api_base={server.url}", "limits.wall_time_s=3")
    assert summary["status"] == "timeout"
    assert time.monotonic() - started < 15


def test_history_stays_bounded():
    history = [{"role": "user", "content": "task"}]
    for i in range(200):
        history += [{"role": "assistant", "content": f"code {i} " * 100}, {"role": "user", "content": "out " * 200}]
    kept = _bounded(history, 20_000)
    assert sum(len(m["content"]) for m in kept) < 25_000
    assert kept[0]["content"].startswith("task")
    assert "earlier messages omitted" in kept[0]["content"]
    assert kept[-1] == history[-1]
    roles = [m["role"] for m in kept]
    assert all(a != b for a, b in zip(roles, roles[1:]))  # user/assistant alternate


def test_ctrl_c_cancels_the_tree_and_leaves_nothing(repo, plugin_path, tmp_path):
    temp = tmp_path / "temp"  # this CLI's temp dir (sandboxes, checkouts): other tests may use /tmp meanwhile
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": plugin_path, "RLM_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(temp)}
    process = subprocess.Popen([sys.executable, "-m", "rlm_pipelines", "task=stuck_repo", "model=scripted",
                                f"task.repo={repo['path']}", "orchestration.prefect=false"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(repl_server_processes(process.pid)) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert len(repl_server_processes(process.pid)) >= 3, "root and two children never ran"
    time.sleep(1)
    servers = repl_server_processes(process.pid)  # this CLI's own (other tests may run sandboxes in parallel)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    tree = json.loads((run_dir_of(tmp_path) / "run.json").read_text())
    assert tree["status"] == "cancelled"
    assert {a["status"] for a in agents(tree["root"])} <= {"cancelled"}
    assert still_running(servers) == []
    assert list(temp.glob("rlm-*")) == []  # agents' sandboxes, the base checkout, the patch check


def test_sub_agents_edit_their_own_checkouts_only(repo, tmp_path):
    """Children's checkouts share file contents with each other (hardlinks): an edit is a replacement, so
    one child's change is invisible to its siblings and to the root, and writing in place is refused."""
    register_script("editors", DepthScript({
        0: [Turn("print(rlm_query_batched(['one', 'two', 'three']))"),
            Turn("print(sh('git status --short') or 'clean')\nFINAL('done')")],
        1: [Turn("import os\n"
                 "print(edit_file('alpha/core.py', 'return a + b', f'return a + b  # {task}'))\n"
                 "try:\n    open('/workspace/repo/beta/util.py', 'a').write('x')\n"
                 "except PermissionError:\n    print('in-place write refused')\n"
                 "FINAL(sh('git diff --stat').strip() + ' | ' + sh('grep -c return alpha/core.py').strip() + "
                 "' | ' + open('/workspace/repo/alpha/core.py').read().split(chr(10))[2])")],
    }))
    summary, tree, _ = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}", "model.model=scripted/editors")
    assert summary["status"] == "ok", tree["error"]
    results = sorted(a["result"] for a in agents(tree["root"], 1))
    assert all("1 file changed" in r for r in results)
    assert [r.rsplit("# ", 1)[1] for r in results] == ["one", "three", "two"]  # each saw only its own edit
    assert "in-place write refused" in json.dumps(tree)
    assert "clean" in tree["root"]["iterations"][1]["stdout"]  # the root's checkout is untouched


def test_root_patch_usage_rollup_truncation_and_no_code_replies(repo, tmp_path, monkeypatch):
    """Over real HTTP: a reply without code gets an observation; a child's long findings are cut and
    flagged; the root's new file is in the patch; usage rolls up the tree."""
    def reply(request):
        text = json.dumps(request["messages"])
        if "depth 1 of" in request["messages"][0]["content"]:
            return "```python\nFINAL('x' * 500)\n```"
        if "[iteration 1/" in request["messages"][-1]["content"]:
            return "Let me think about this first."  # no code at all
        if "[iteration 2/" in request["messages"][-1]["content"]:
            return ("```python\nfound = rlm_query('report at length')\nprint(repr(found))\n"
                    "open('/workspace/repo/NEW.md', 'w').write('new file')\n"
                    "print(edit_file('alpha/core.py', 'def add(a, b):', 'def add(a, b:'))\n```")
        assert "would not parse" in text  # the refused edit reached the model
        return "```python\nprint(edit_file('beta/util.py', 'min(hi, x)', 'min(x, hi)'))\nFINAL('done')\n```"

    monkeypatch.setenv("RLM_TEST_KEY", "k")
    with OpenAIServer(reply=reply) as server:
        summary, tree, run_dir = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}", "model=local",
                                     f"model.api_base={server.url}", "model.api_key_env=RLM_TEST_KEY",
                                     "model.input_cost_per_mtok=1.0", "model.output_cost_per_mtok=2.0",
                                     "limits.result_truncation_limit=100")
    assert summary["status"] == "partial", tree["error"]  # the child's findings were cut for the root
    assert summary["partial"]["truncated"] == 1
    root = tree["root"]
    assert "no ```python code block" in root["iterations"][1]["prompt"]
    # the parent sees the head and tail of the findings, 100 characters in all, and how much was cut
    assert "'" + "x" * 50 + "\\n... [400 characters cut] ...\\n" + "x" * 50 + "'" in root["iterations"][1]["stdout"]
    child = root["children"][0]
    assert child["result_truncated"] is True
    assert len(child["result"]) == 500
    assert "SyntaxError" in root["iterations"][1]["error"]
    patch = (run_dir / "patch.diff").read_text()
    assert "new file mode" in patch
    assert "+new file" in patch
    assert "min(x, hi)" in patch
    assert "def add(a, b:" not in patch
    own, total = root["usage"]["own"], root["usage"]["total"]
    assert own["llm_calls"] == 3
    assert total["llm_calls"] == 4 == tree["usage"]["llm_calls"]
    assert total["tokens"] == tree["usage"]["tokens"]
    assert total["cost_usd"] == pytest.approx(tree["usage"]["cost_usd"])
    assert total["cost_usd"] > 0


def test_token_budget_stops_the_tree(repo, tmp_path):
    summary, tree, _ = run(tmp_path, "task=repo_todos", f"task.repo={repo['path']}", "limits.max_tokens=3000")
    assert summary["status"] == "budget_exceeded"
    assert "limits.max_tokens" in tree["error"]
    assert tree["usage"]["tokens"] >= 3000
    assert tree["root"]["status"] == "budget_exceeded"
