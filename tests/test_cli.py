"""The product end to end through the real CLI in subprocesses: Hydra, the Prefect flow against a real
Prefect server, the sandbox, the scripted and the local-HTTP model paths, plugins, bad input, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlm_pipelines.models.scripted import register_script
from rlm_tasks.monte_cristo import task as monte_cristo
from tests.conftest import (BOOK, api, check_monte_cristo_outputs, cli, repl_server_processes, run_dir_of,
                            still_running)
from tests.fakes.openai_server import OpenAIServer

def test_monte_cristo_scripted_through_the_cli_and_prefect(prefect_server, tmp_path):
    done = cli(["task=monte_cristo", "model=scripted", f"task.source={BOOK}"], tmp_path, prefect_server["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iteration 4/20" in done.stderr
    assert "llm_query_batched x 39" in done.stderr
    run = check_monte_cristo_outputs(run_dir_of(tmp_path))
    assert run["model"] == "scripted/monte_cristo"
    url = prefect_server["url"]
    flow_runs = [r for r in api(url, "/flow_runs/filter", {"limit": 200}) if r["name"] == "monte_cristo-scripted"]
    assert flow_runs
    assert flow_runs[-1]["state_type"] == "COMPLETED"
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_runs[-1]["id"]]}}})
    steps = {t["name"].rsplit("-", 1)[0] for t in tasks}  # Prefect names task runs "<task name>-<suffix>"
    assert {"prepare inputs", "run engine", "write outputs", "downstream steps"} <= steps
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["rlm-run-summary"]}}})
    assert any(a["flow_run_id"] == flow_runs[-1]["id"] for a in artifacts)


def test_monte_cristo_through_a_local_openai_compatible_server(prefect_server, tmp_path):
    """model=local: the real HTTP path. The server answers with the task's scripted replies."""
    from rlm_pipelines.models import scripted

    register_script("mc-http", monte_cristo.script(monte_cristo.params()))

    def reply(request):
        name = "scripted/mc-http.sub" if request["model"] == "mc-sub" else "scripted/mc-http"
        return scripted.reply(name, request["messages"])

    with OpenAIServer(reply=reply) as server:
        done = cli(["task=monte_cristo", "model=local", f"model.api_base={server.url}", "model.model=openai/mc-root",
                    "model.sub.model=openai/mc-sub", f"task.source={BOOK}"], tmp_path, prefect_server["env"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(server.requests) == 43
    check_monte_cristo_outputs(run_dir_of(tmp_path))


def test_a_third_party_task_plugin_runs(plugin_path, tmp_path):
    env = {"PYTHONPATH": plugin_path}
    helped = cli(["--help"], tmp_path, env)
    assert "slow_echo" in helped.stdout
    done = cli(["task=slow_echo", "model=scripted", "task.text=plugged in", "orchestration.prefect=false"],
               tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir_of(tmp_path) / "result.json").read_text()) == {"echoed": "PLUGGED IN"}


@pytest.mark.parametrize("args,env,message", [
    (["model=gemini_flash"], {"OPENROUTER_API_KEY": ""}, "set the environment variable OPENROUTER_API_KEY"),
    (["model=scripted", "task.source=/no/such/book.txt"], {}, "task.source='/no/such/book.txt' is not a file"),
    (["task=doc_qa", "model=scripted", "task.question=why", "task.documents=[/no/such/dir]"], {},
     "matches no file"),
    (["task=nope"], {}, "Could not find 'task/nope'"),
    (["model=scripted", "limits.max_iterations=many"], {}, "could not be converted to Integer"),
    (["task=repo_todos", "task.repo=.", "engine=document", "model=scripted"], {},
     "engine=document runs DocumentTasks and task=repo_todos is not one"),
])
def test_bad_input_fails_before_any_sandbox_with_a_clear_message(args, env, message, tmp_path):
    done = cli(args, tmp_path, env, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert not list(tmp_path.glob("outputs/runs/*/*/*/run.json"))


def test_the_sandbox_command_has_help_and_a_cleanup_specific_key_message(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "rlm_pipelines.sandbox", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert "cleanup" in helped.stdout
    env = {k: v for k, v in os.environ.items() if k != "DAYTONA_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "rlm_pipelines.sandbox", "cleanup", "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "cleanup lists and deletes sandboxes through the Daytona API" in done.stderr
    assert "sandbox=local" not in done.stderr


def test_budget_exhaustion_is_recorded(tmp_path):
    done = cli(["model=scripted", f"task.source={BOOK}", "limits.max_tokens=100000", "orchestration.prefect=false"],
               tmp_path)
    assert done.returncode == 1
    run = json.loads((run_dir_of(tmp_path) / "run.json").read_text())
    assert run["status"] == "budget_exceeded"
    assert "limits.max_tokens" in run["error"]
    assert len(run["root"]["iterations"]) == 2  # the fan-out spent it; the next turn was refused


def test_ctrl_c_leaves_a_cancelled_run_and_no_sandbox(plugin_path, prefect_server, tmp_path):
    temp = tmp_path / "temp"  # this CLI's temp dir (sandbox folders): other tests' runs may use /tmp meanwhile
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": plugin_path, "TMPDIR": str(temp), **prefect_server["env"]}
    process = subprocess.Popen([sys.executable, "-m", "rlm_pipelines", "task=slow_echo", "model=scripted",
                                "task.sleep_s=120"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not repl_server_processes(process.pid) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert repl_server_processes(process.pid), "the run never started its sandbox"
    time.sleep(1)  # the slow cell is running
    servers = repl_server_processes(process.pid)  # this CLI's own (other tests may run sandboxes in parallel)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    run = json.loads((run_dir_of(tmp_path) / "run.json").read_text())
    assert run["status"] == "cancelled"
    assert still_running(servers) == []
    assert not list(temp.glob("rlm-*"))


def test_repo_run_through_prefect_has_a_task_run_per_agent(prefect_server, tmp_path):
    from tests.fixtures.todo_repo import TODOS, build

    repo = build(tmp_path / "src")
    done = cli(["task=repo_todos", "model=scripted", f"task.repo={repo['path']}"], tmp_path,
               {**prefect_server["env"], "RLM_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    assert (run_dir / "patch.diff").is_file()
    url = prefect_server["url"]
    flow_runs = [r for r in api(url, "/flow_runs/filter", {"limit": 200}) if r["name"] == "repo_todos-scripted"]
    assert flow_runs
    assert flow_runs[-1]["state_type"] == "COMPLETED"
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_runs[-1]["id"]]}}})
    agent_runs = [t for t in tasks if t["name"].startswith("agent-depth")]
    assert len(agent_runs) == 1 + 3 + TODOS
    assert {t["name"] for t in agent_runs} == {"agent-depth0", "agent-depth1", "agent-depth2"}
    assert all(t["state_type"] == "COMPLETED" for t in agent_runs)
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["rlm-run-summary"]}}})
    assert any(a["flow_run_id"] == flow_runs[-1]["id"] for a in artifacts)
