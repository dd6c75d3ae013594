"""The call cache and resume (issue 13): content-addressed calls on disk shared by runs, safe under
concurrent writers; `resume=<run dir>` replays a stopped run's calls free. Real HTTP to the fake OpenAI
server, real CLI processes and sandboxes."""

import json
import subprocess
import sys

from rlm_pipelines.config import ModelSpec
from rlm_pipelines.models.callstore import cache_on
from tests.conftest import cli, run_dir_of
from tests.fakes.openai_server import OpenAIServer
from tests.fakes.rlm_replies import DOCUMENT_TASK, document_root, document_sub, tree_shape


def _run(tmp_path, name, *extra):
    """A document run over real HTTP: (run.json, summary.json, requests the servers got)."""
    out = tmp_path / name
    out.mkdir()
    with OpenAIServer(reply=document_root) as root, OpenAIServer(reply=document_sub) as sub:
        done = cli([*DOCUMENT_TASK, "model=local", f"model.api_base={root.url}", "model.model=openai/root",
                    "model.sub.model=openai/sub", f"model.sub.api_base={sub.url}", "model.input_cost_per_mtok=3",
                    "model.output_cost_per_mtok=15", "orchestration.prefect=false", *extra], out,
                   env={"RLM_CACHE_DIR": str(tmp_path / "cache")})
        requests = len(root.requests) + len(sub.requests)
    run_dir = run_dir_of(out)
    tree, summary = (json.loads((run_dir / name).read_text()) for name in ("run.json", "summary.json"))
    assert tree["status"] in ("ok", "budget_exceeded"), (tree["error"], done.stderr[-3000:])
    return tree, summary, requests


def _llm_calls(node):
    found = [node] if node["kind"] == "llm_call" else []
    for child in node["children"]:
        found += _llm_calls(child)
    return found


def test_a_second_identical_run_is_answered_from_the_cache_free_and_marked(tmp_path):
    tree0, summary0, requests0 = _run(tmp_path, "first")  # temperature 0: the cache is on (model.cache null)
    assert requests0 == 6 and summary0["cached_calls"] == 0 and summary0["cost_usd"] > 0
    tree1, summary1, requests1 = _run(tmp_path, "second")
    assert requests1 == 0  # not one HTTP request
    assert tree_shape(tree1["root"]) == tree_shape(tree0["root"]) and tree1["result"] == tree0["result"]
    assert summary1["llm_calls"] == summary1["cached_calls"] == 6 and summary1["cost_usd"] == 0
    assert summary1["saved_usd"] == summary0["cost_usd"]
    assert all(i["origin"] == "cached" for i in tree1["root"]["iterations"])
    assert [c["origin"] for c in _llm_calls(tree1["root"])] == ["cached"] * 4
    # model.cache=false: live again
    _, summary2, requests2 = _run(tmp_path, "third", "model.cache=false")
    assert requests2 == 6 and summary2["cached_calls"] == 0


def test_scripted_models_and_warm_models_are_not_cached_by_default():
    assert not cache_on(ModelSpec(model="scripted/needles", cache=True))  # free and deterministic already
    assert cache_on(ModelSpec(model="openai/x", temperature=0.0))
    assert not cache_on(ModelSpec(model="openai/x", temperature=0.7))
    assert cache_on(ModelSpec(model="openai/x", temperature=0.7, cache=True))


WRITER = """
import sys
from pathlib import Path
from rlm_pipelines.models.callstore import DiskCache
cache, me = DiskCache(Path(sys.argv[1])), sys.argv[2]
for i in range(300):
    cache.record({"key": "ab" + "0" * 62, "writer": me, "i": i, "response": {"text": me * 5000}})
"""


def test_two_processes_writing_one_entry_at_once_leave_a_whole_entry(tmp_path):
    from rlm_pipelines.models.callstore import DiskCache

    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name]) for name in ("x", "y")]
    cache, seen = DiskCache(tmp_path), 0
    while any(w.poll() is None for w in writers):  # read while they write: never a torn entry
        entry = cache.lookup("", "ab" + "0" * 62)
        if entry is not None:
            seen += 1
            assert entry["response"]["text"] == entry["writer"] * 5000
    assert [w.wait() for w in writers] == [0, 0]
    entry = json.loads((tmp_path / "ab" / ("ab" + "0" * 62 + ".json")).read_text())
    assert entry["writer"] in ("x", "y") and entry["i"] == 299
    assert list((tmp_path / "ab").iterdir()) == [tmp_path / "ab" / ("ab" + "0" * 62 + ".json")]  # no temp left


def test_a_budget_stopped_run_resumes_replaying_its_calls_free(tmp_path):
    first, summary0, requests0 = _run(tmp_path, "stopped", "limits.max_cost_usd=0.0001", "model.cache=false")
    assert first["status"] == "budget_exceeded" and requests0 >= 1
    stopped_dir = summary0["run_dir"]
    tree, summary, requests = _run(tmp_path, "resumed", f"resume={stopped_dir}", "model.cache=false")
    assert tree["status"] == "ok", tree["error"]
    assert tree["resumed_from"] == stopped_dir and summary["resumed_from"] == stopped_dir
    assert requests == 6 - requests0  # what the stopped run had asked was not asked again
    assert summary["cached_calls"] == requests0 and summary["saved_usd"] == summary0["cost_usd"] > 0
