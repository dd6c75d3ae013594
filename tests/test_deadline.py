"""limits.wall_time_s holds inside the document engine (issue 11, point 15): a cell still running, a model
call that hangs and an llm_query waiting on a hung sub-model are all cut at the run's deadline, through the
real CLI, a real sandbox and a real (local, fake) OpenAI-compatible server."""

import json
import time

from tests.conftest import cli, run_dir_of
from tests.fakes.openai_server import OpenAIServer

# A bound on how long a run with a 30 s deadline may take (the deadline, then the interrupt's grace and the
# final records; generous, for a loaded machine); each attack would run for 120 s or more without it.
WALL_TIME_S = 30
CUT_BY_S = 60


def _reply(code):
    return f"[[ ## reasoning ## ]]\nwork\n\n[[ ## code ## ]]\n{code}\n\n[[ ## completed ## ]]"


def _run(tmp_path, server, *extra):
    """A needles run (tiny inputs) on the fake server, in-process steps; (seconds, exit code, run.json)."""
    started = time.monotonic()
    done = cli(["task=needles", "task.documents=2", "task.doc_chars=200", "task.needles=2", "model=local",
                f"model.api_base={server.url}", "model.model=openai/root", "orchestration.prefect=false",
                f"limits.wall_time_s={WALL_TIME_S}", *extra], tmp_path, timeout=300)
    seconds = time.monotonic() - started
    tree = json.loads((run_dir_of(tmp_path) / "run.json").read_text())
    print(f"run ended after {seconds:.1f} s (deadline {WALL_TIME_S} s), status {tree['status']}")
    return seconds, done, tree


def _assert_cut_at_the_deadline(seconds, done, tree):
    assert tree["status"] == "timeout", (tree["status"], tree["error"], done.stderr[-2000:])
    assert "limits.wall_time_s" in tree["error"]
    agent = tree["root"]  # the document engine's one agent
    assert agent["status"] == "timeout" and "limits.wall_time_s" in agent["error"]
    assert done.returncode == 1
    assert seconds < CUT_BY_S, f"the run took {seconds:.0f} s: not cut at its {WALL_TIME_S} s deadline"


def test_a_long_cell_is_cut_at_the_run_deadline(tmp_path):
    cell = "import time\nstarted = time.time()\nwhile time.time() - started < 120:\n    time.sleep(0.05)"
    with OpenAIServer(reply=lambda request: _reply(cell)) as server:
        seconds, done, tree = _run(tmp_path, server)
    _assert_cut_at_the_deadline(seconds, done, tree)
    assert len(server.requests) == 1  # the model was not asked again after the deadline


def test_a_hanging_model_call_is_cut_at_the_run_deadline(tmp_path):
    with OpenAIServer(reply=lambda request: _reply("print(1)"), latency_s=150) as server:
        seconds, done, tree = _run(tmp_path, server, "model.timeout_s=120", "model.num_retries=3")
    _assert_cut_at_the_deadline(seconds, done, tree)
    assert len(server.requests) == 1  # never retried as if transient


def test_a_hanging_llm_query_is_cut_at_the_run_deadline(tmp_path):
    with OpenAIServer(reply=lambda request: _reply("print(llm_query('hello'))")) as root, \
            OpenAIServer(reply="late", latency_s=150) as sub:
        seconds, done, tree = _run(tmp_path, root, "model.sub.model=openai/sub", f"model.sub.api_base={sub.url}",
                                   "model.timeout_s=120")
    _assert_cut_at_the_deadline(seconds, done, tree)
    assert len(sub.requests) == 1
