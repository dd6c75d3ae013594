"""Record and replay (issue 13): every model call of a run goes to calls.jsonl, and `model=replay
model.source=<run dir>` re-runs it offline, with no key and the fake OpenAI server stopped (real HTTP while
recording, real sandboxes and CLI processes always)."""

import json

from tests.conftest import cli, run_dir_of
from tests.fakes.openai_server import OpenAIServer
from tests.fakes.rlm_replies import DOCUMENT_TASK, document_root, document_sub, repo_tree, tree_shape

SECRET = "sk-test-replay-SECRET-0123456789"
TASK = DOCUMENT_TASK
_root, _sub, _shape = document_root, document_sub, tree_shape


def _model(root, sub):
    return ["model=local", f"model.api_base={root.url}", "model.model=openai/root", "model.sub.model=openai/sub",
            f"model.sub.api_base={sub.url}", "model.input_cost_per_mtok=3", "model.output_cost_per_mtok=15",
            "model.api_key_env=RLM_TEST_KEY", "model.cache=false"]


def _load(run_dir):
    return (json.loads((run_dir / "run.json").read_text()), json.loads((run_dir / "summary.json").read_text()))


def _record(tmp_path, *extra):
    out = tmp_path / "original"
    out.mkdir()
    with OpenAIServer(reply=_root) as root, OpenAIServer(reply=_sub) as sub:
        done = cli([*TASK, *_model(root, sub), "orchestration.prefect=false", *extra], out,
                   env={"RLM_TEST_KEY": SECRET, "RLM_CACHE_DIR": str(tmp_path / "cache")})
        requests = len(root.requests) + len(sub.requests)
        assert SECRET in root.requests[0]["headers"].get("authorization", "")  # the key was really used
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir_of(out), requests


def _replay(tmp_path, source, *extra, name="replay", key=""):
    out = tmp_path / name
    out.mkdir()
    env = {"RLM_TEST_KEY": key, "RLM_CACHE_DIR": str(tmp_path / "cache")}
    done = cli([*TASK, "model=replay", f"model.source={source}", "orchestration.prefect=false", *extra], out, env=env)
    return done, run_dir_of(out)


def test_a_document_run_replays_offline_with_the_same_result_tree_and_summary(tmp_path):
    original, requests = _record(tmp_path)
    calls = [json.loads(line) for line in (original / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == requests == 2 + 4  # two root turns, four sub calls: each recorded once
    assert {c["agent"] for c in calls} == {"root", "sub"} and all(c["origin"] == "live" for c in calls)
    assert all(c["request"]["messages"] and c["response"]["outputs"] and c["cost_usd"] > 0 for c in calls)
    # no secret anywhere in the run folder (the key was in the environment and went to the server)
    for path in original.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path

    done, replayed = _replay(tmp_path, original)  # the servers are stopped, the key is unset
    assert done.returncode == 0, done.stderr[-3000:]
    (tree0, summary0), (tree1, summary1) = _load(original), _load(replayed)
    assert tree1["result"] == tree0["result"] and _shape(tree1["root"]) == _shape(tree0["root"])
    for key in ("llm_calls", "prompt_tokens", "completion_tokens", "cost_usd", "iterations", "agents", "score"):
        assert summary1[key] == summary0[key], key
    assert summary1["replayed"] is True and summary1["replayed_calls"] == requests and summary0["replayed"] is False
    assert tree1["replayed_from"] == str(original.resolve())


def test_a_changed_task_stops_the_replay_naming_the_agent_the_iteration_and_the_line(tmp_path):
    original, _ = _record(tmp_path)
    done, replayed = _replay(tmp_path, original, "task.needles=3")
    assert done.returncode != 0
    tree, summary = _load(replayed)
    assert tree["status"] == summary["status"] == "error"
    error = tree["error"]
    assert "diverged" in error and "agent 'root'" in error and "iteration/call 1" in error, error
    assert "first differing line" in error and "recorded:" in error, error


def test_on_miss_live_continues_with_the_live_model(tmp_path):
    original, _ = _record(tmp_path)
    with OpenAIServer(reply=_root) as root, OpenAIServer(reply=_sub) as sub:
        # the recorded model pointed at servers that are gone: the live part goes to these new ones
        done, replayed = _replay(tmp_path, original, "task.needles=3", "model.on_miss=live",
                                 f"model.api_base={root.url}", f"model.sub.api_base={sub.url}", key=SECRET)
        live = len(root.requests) + len(sub.requests)
    tree, summary = _load(replayed)
    assert live > 0 and tree["status"] == "ok", (tree["error"], done.stderr[-2000:])


def test_a_depth_two_repo_run_with_concurrent_sub_agents_replays_each_agent_its_own_calls(tmp_path):
    from tests.fixtures.todo_repo import build

    repo = build(tmp_path / "repo")
    task = ["task=repo_todos", f"task.repo={repo['path']}"]
    out = tmp_path / "original"
    out.mkdir()
    env = {"RLM_TEST_KEY": SECRET, "RLM_CACHE_DIR": str(tmp_path / "cache")}
    with OpenAIServer(reply=repo_tree, latency_s=0.2) as server:
        done = cli([*task, "model=local", f"model.api_base={server.url}", "model.api_key_env=RLM_TEST_KEY",
                    "model.input_cost_per_mtok=1", "model.output_cost_per_mtok=2", "model.cache=false",
                    "orchestration.prefect=false"], out, env=env)
        requests = len(server.requests)
    assert done.returncode == 0, done.stderr[-3000:]
    original = run_dir_of(out)
    calls = [json.loads(line) for line in (original / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == requests == 2 + 2 * 2 + 4  # root, 2 children (2 turns each), 4 leaves (1 turn)
    assert len({c["agent"] for c in calls}) == 7

    replay_out = tmp_path / "replay"
    replay_out.mkdir()
    done = cli([*task, "model=replay", f"model.source={original}", "orchestration.prefect=false"], replay_out,
               env={**env, "RLM_TEST_KEY": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    (tree0, summary0), (tree1, summary1) = _load(original), _load(run_dir_of(replay_out))
    assert _shape(tree1["root"]) == _shape(tree0["root"])  # every agent got its own answers
    for key in ("llm_calls", "prompt_tokens", "completion_tokens", "cost_usd", "agents", "max_depth", "status"):
        assert summary1[key] == summary0[key], key
    assert summary1["replayed"] and summary1["replayed_calls"] == requests
    assert all(i.get("origin") == "replayed" for i in tree1["root"]["iterations"])
