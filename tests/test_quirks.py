"""Model quirks (issue 13), each through the local fake OpenAI server (real HTTP), real runs and real
bubblewrap sandboxes: what ran (run.json iterations), what the model was told (the next request at the
server) and the final result. The policies are in rlm_pipelines/engines/replies.py and the README."""

import json

import pytest

from tests.conftest import cli, composed, run_dir_of, run_scripted
from tests.fakes.openai_server import OpenAIServer
from tests.fakes.rlm_replies import chat, fields, iteration_of
from tests.fixtures.todo_repo import build


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("repo"))


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
    replies = ["```python\nanswer = 6 * 7\nprint('computed', answer)\n```\nSo the answer is:\nFINAL(41)",
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
    replies = ["```python\nreport = 'from a variable'\n```", "I will not call FINAL(x) yet. Now I am done:\n**FINAL_VAR(report)**"]
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


# --------------------------------------------------------------------------- the document engine

def _document_run(tmp_path, replies, *extra):
    """A needles run on the fake server through the real CLI; replies[i] at iteration i+1:
    (exit code, run.json, request bodies)."""
    def reply(request):
        return replies[iteration_of(request) - 1]

    with OpenAIServer(reply=reply) as server:
        done = cli(["task=needles", "task.documents=2", "task.doc_chars=200", "task.needles=2", "model=local",
                    f"model.api_base={server.url}", "model.model=openai/root", "orchestration.prefect=false",
                    f"limits.max_iterations={len(replies)}", *extra], tmp_path, timeout=300)
    tree = json.loads((run_dir_of(tmp_path) / "run.json").read_text())
    return done, tree, [request["body"] for request in server.requests]


def test_document_engine_reply_shapes(tmp_path):
    replies = [
        # renamed and re-cased fields
        "[[ ## Thinking ## ]]\nlook\n\n[[ ## python ## ]]\nseen = ['renamed']\nprint(seen)\n\n[[ ## completed ## ]]",
        # no fields at all, only prose and a fenced block
        "Let me continue.\n```python\nseen.append('fenced')\nprint(seen)\n```",
        # a think tag holding a code field; SUBMIT in the reasoning, before the output was seen
        "<think>[[ ## code ## ]]\nseen.append('thought')</think>\n"
        + fields(reasoning="done: SUBMIT(counts={'x': 1})", code="seen.append('think')\nprint(seen)"),
        # cut at max_tokens mid-code
        {"content": fields(reasoning="r", code="open('/tmp/half', 'w').write('x')\nfor i in")[:-40],
         "finish_reason": "length"},
        # only reasoning tokens, no text
        {"content": None, "reasoning_content": "hidden thoughts"},
        # JSON with code=null
        '{"reasoning": "r", "code": null}',
        # several blocks, the second SUBMITs before the first one's output was seen
        fields(reasoning="r", code="```python\nseen.append('block1')\nprint(seen)\n```\n"
                                    "```python\nSUBMIT(counts={'early': 1})\n```"),
        fields(reasoning="r", code="import os\nSUBMIT(counts={k: 1 for k in seen + [str(os.path.exists('/tmp/half'))]})"),
    ]
    done, tree, requests = _document_run(tmp_path, replies)
    assert tree["status"] == "ok", (tree["error"], done.stderr[-2000:])
    assert len(requests) == len(replies)  # one call per turn: no hidden adapter retry
    steps = tree["root"]["iterations"]
    assert [s["stdout"].strip() for s in steps[:3]] == ["['renamed']", "['renamed', 'fenced']",
                                                         "['renamed', 'fenced', 'think']\n\n[Your reasoning wrote "
                                                         "SUBMIT(...), but only the code field runs, so no answer "
                                                         "was taken. If the answer still stands after the output "
                                                         "above, call SUBMIT(...) in the code.]"]
    assert "cut at the token limit" in steps[3]["stdout"] and steps[3]["code"] == ""
    assert "could not be used" in steps[4]["stdout"] and steps[4]["reasoning"] == "hidden thoughts"
    assert "could not be used" in steps[5]["stdout"] and "null" in steps[5]["stdout"]  # code=None: told
    assert "block 2 called SUBMIT" in steps[6]["stdout"] and "'block1'" in steps[6]["stdout"]
    last = chat(requests[-1])  # the model saw every note before its last turn
    for note in ("only the code field runs", "cut at the token limit", "block 2 called SUBMIT"):
        assert note in last
    assert tree["result"]["counts"] == {"renamed": 1, "fenced": 1, "think": 1, "block1": 1, "False": 1}


def test_document_engine_per_model_prompt_settings(tmp_path):
    replies = [fields(reasoning="r", code="SUBMIT(counts={'a': 1})")]
    done, tree, requests = _document_run(tmp_path, replies, "model.system_prompt=false",
                                         "model.extra_instructions=Never use regular expressions.",
                                         "model.stop=['</code>']")
    assert tree["status"] == "ok", (tree["error"], done.stderr[-2000:])
    body = requests[0]
    assert [m["role"] for m in body["messages"]] == ["user"]
    content = body["messages"][0]["content"]
    # the system prompt, then the extra instructions, then the user's fields
    assert content.startswith("Your input fields are")
    assert content.index("Never use regular expressions.") < content.rindex("[[ ## variables_info ## ]]")
    assert body["stop"] == ["</code>"]


# --------------------------------------------------------------------------- provider model configs

PROVIDERS = ["gpt_mini", "claude_sonnet", "claude_sonnet_direct", "gemini_flash", "gemini_flash_direct", "local",
             "ollama", "llama_cpp"]


@pytest.mark.parametrize("name", PROVIDERS)
def test_each_provider_config_composes_and_is_priced(name):
    import litellm
    from omegaconf import OmegaConf

    from rlm_pipelines.config import ModelSpec, check_ranges
    from rlm_pipelines.models.litellm_client import litellm_kwargs

    spec = ModelSpec(**OmegaConf.to_container(composed(f"model={name}").model, resolve=True))
    check_ranges(spec, "model.")
    assert spec.name == name and "/" in spec.model
    given = spec.input_cost_per_mtok is not None and spec.output_cost_per_mtok is not None
    try:
        known = sum(litellm.cost_per_token(model=spec.model, prompt_tokens=1000, completion_tokens=1000)) > 0
    except Exception:
        known = False
    assert given or known, f"{name}: no price in the config and none in litellm's map for {spec.model}"
    kwargs = litellm_kwargs(spec)
    assert "stop" not in kwargs and "reasoning_effort" not in kwargs  # quirk settings only when set


def test_help_lists_every_model_with_a_line_about_it(tmp_path):
    from rlm_pipelines.paths import conf_dir

    helped = cli(["--help"], tmp_path)
    assert helped.returncode == 0
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        about = path.read_text().splitlines()[0].lstrip("# ")
        assert f"  {path.stem:<22}{about}" in helped.stdout
