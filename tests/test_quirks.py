"""Model quirks (issue 13), each through the local fake OpenAI server (real HTTP), real runs and real
bubblewrap sandboxes: what ran (run.json iterations), what the model was told (the next request at the
server) and the final result. The policies are in rlm_pipelines/engines/replies.py and the README."""

import json

import pytest

from tests.conftest import cli, run_scripted
from tests.fakes.openai_server import OpenAIServer
from tests.fixtures.todo_repo import build


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("repo"))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "cache"))


def _turn(request):
    """Which iteration of the root agent this request is (1-based)."""
    last = request["messages"][-1]["content"]
    return int(last.split("[iteration ", 1)[1].split("/", 1)[0])


def _repo_run(tmp_path, repo, replies, *extra):
    """A repo run whose root agent gets replies[i] at iteration i+1: (summary, run.json, requests)."""
    with OpenAIServer(reply=lambda request: replies[_turn(request) - 1]) as server:
        summary, tree = run_scripted(tmp_path / "run", "task=repo_todos", f"task.repo={repo['path']}",
                                     "model=local", f"model.api_base={server.url}", "model.model=openai/root",
                                     "limits.max_iterations=4", *extra)
    return summary, tree, [request["body"] for request in server.requests]


def _told(request):
    """What the model was told on this request (the newest user message)."""
    return request["messages"][-1]["content"]


def test_a_final_in_prose_next_to_code_waits_for_the_output(repo, tmp_path):
    replies = ["```python\nanswer = 6 * 7\nprint('computed', answer)\n```\nSo the answer is FINAL(41).",
               "```python\nFINAL('it is ' + str(answer))\n```"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies)
    assert summary["status"] == "ok", tree["error"]
    first, second = tree["root"]["iterations"]
    assert first["stdout"] == "computed 42\n"  # the code ran ...
    assert first["quirks"] == ["early_final_held"]
    told = _told(requests[1])  # ... and the model saw its output and why its FINAL was not taken
    assert "not taken" in told and "model.early_final=confirm" in told and "computed 42" in told
    assert tree["result"] == {"report": "it is 42"}  # the answer it gave after seeing the output, not the guess


def test_a_final_in_a_later_block_does_not_run_before_the_output_is_seen(repo, tmp_path):
    replies = ["```python\nprint('looked')\n```\n```python\nprint('guessed')\nFINAL('guess')\n```",
               "```python\nFINAL('checked')\n```"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies)
    first = tree["root"]["iterations"][0]
    assert first["stdout"] == "looked\n"  # block 2, with its FINAL, did not run
    assert "in code block 2" in _told(requests[1]) and "did not run" in _told(requests[1])
    assert tree["result"] == {"report": "checked"}


def test_early_final_accept_takes_the_prose_final_after_the_code_ran(repo, tmp_path):
    replies = ["```python\nopen('/tmp/ran', 'w').write('x')\nprint('ran')\n```\nFINAL(\"done early\")"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies, "model.early_final=accept")
    assert summary["status"] == "ok", tree["error"]
    assert len(requests) == 1
    assert tree["root"]["iterations"][0]["stdout"] == "ran\n"
    assert tree["result"] == {"report": "done early"}


def test_a_final_in_prose_with_no_code_is_the_answer(repo, tmp_path):
    replies = ["```python\nreport = 'from a variable'\n```", "I am done. FINAL_VAR(report)"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies)
    assert summary["status"] == "ok", tree["error"]
    assert tree["result"] == {"report": "from a variable"}


def test_fences_prose_and_thinking(repo, tmp_path):
    replies = ["Let me look.\n```py\nseen = ['py']\n```\nthen\n```repl\nseen.append('repl')\n```\n"
               "```\nseen.append('bare')\n```\n```bash\nrm -rf /workspace/repo\n```\n"
               "<think>maybe\n```python\nseen.append('thought')\n```\n</think>\n"
               "```python\nprint(seen)\n```\nThat is all.",
               {"content": "<think>done now</think>\n```python\nFINAL(','.join(seen))\n```",
                "reasoning_content": "the provider's own reasoning field"}]
    summary, tree, requests = _repo_run(tmp_path, repo, replies)
    assert summary["status"] == "ok", tree["error"]
    first, second = tree["root"]["iterations"]
    assert first["stdout"] == "['py', 'repl', 'bare']\n"  # bash not run, the thought not run
    assert "```python\nseen.append('thought')" in first["reasoning"]  # kept in the record
    assert set(first["quirks"]) == {"think_tags", "several_blocks"}
    assert second["reasoning"] == "the provider's own reasoning field\n\ndone now"
    assert "<think>" in second["response"]  # the reply as received stays in the record
    assert tree["result"] == {"report": "py,repl,bare"}


def test_a_reply_cut_at_max_tokens_does_not_run(repo, tmp_path):
    replies = [{"content": "```python\nopen('/tmp/half', 'w').write('x')\nprint('half ran')\nfor i in",
                "finish_reason": "length"},
               "```python\nimport os\nFINAL(str(os.path.exists('/tmp/half')))\n```"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies, "model.max_tokens=77")
    first = tree["root"]["iterations"][0]
    assert first["code"] == "" and first["stdout"] == "" and first["quirks"] == ["cut"]
    told = _told(requests[1])
    assert "cut at the token limit (model.max_tokens=77, finish_reason=length)" in told
    assert tree["result"] == {"report": "False"}  # nothing of the cut reply ran


def test_empty_content_with_only_reasoning_tokens(repo, tmp_path):
    replies = [{"content": None, "reasoning_content": "I thought for a long time"},
               "```python\nFINAL('second try')\n```"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies)
    first = tree["root"]["iterations"][0]
    assert first["reasoning"] == "I thought for a long time" and first["quirks"] == ["empty"]
    assert "no text (only hidden reasoning)" in _told(requests[1])
    assert requests[1]["messages"][-2] == {"role": "assistant", "content": "(empty reply)"}
    assert tree["result"] == {"report": "second try"}


def test_per_model_prompt_settings_are_config(repo, tmp_path):
    replies = ["```python\nFINAL('ok')\n```"]
    summary, tree, requests = _repo_run(tmp_path, repo, replies, "model.system_prompt=false",
                                        "model.extra_instructions=Always answer in French.",
                                        "model.stop=['</code>']", "model.reasoning_effort=low")
    assert summary["status"] == "ok", tree["error"]
    body = requests[0]
    assert [m["role"] for m in body["messages"]] == ["user"]  # no system role for this model
    content = body["messages"][0]["content"]
    assert content.startswith("You are a software engineer") and "Always answer in French." in content
    assert content.index("Always answer in French.") < content.index("[iteration 1/")
    assert body["stop"] == ["</code>"] and body["reasoning_effort"] == "low"


def test_an_unknown_early_final_policy_is_refused(repo, tmp_path):
    done = cli(["task=repo_todos", f"task.repo={repo['path']}", "model=local", "model.early_final=maybe"], tmp_path)
    assert done.returncode != 0
    assert "model.early_final='maybe' is not a policy: use one of confirm, accept" in done.stderr
