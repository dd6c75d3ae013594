"""Issue 12, point 5: dspy's in-sandbox sub-agents (`dspy.Predict` and friends, which dspy 3.4.1 installs in
every interpreter and advertises in the RLM prompt) stay inside the run's budget and its record.

Performed for real: the CLI, a bubblewrap sandbox, and two fake OpenAI-compatible HTTP servers (the root
model writes cells that build sub-agents; the sub model answers them in dspy's field format)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from tests.conftest import cli, run_dir_of
from tests.fakes.openai_server import OpenAIServer
from tests.fakes.rlm_replies import ITERATION, chat, fields, root_for

PRICE_IN, PRICE_OUT = 1000, 2000  # dollars per million tokens: every call costs something visible
SUB_AGENTS = ("qa = dspy.Predict('question -> answer')\n"
              "print('P1', qa(question='first?').answer)\n"
              "cot = dspy.ChainOfThought('question -> answer')\n"
              "print('P2', cot(question='second?').answer)\n"
              "print('Q', llm_query('third?'))\n")
MORE = ("for i in range({n}):\n"
        "    try:\n"
        "        print('extra', qa(question=f'extra {{i}}?').answer)\n"
        "    except Exception as e:\n"
        "        print('REFUSED', e)\n")
NESTED = ("deep = dspy.RLM('context, query -> answer', max_iters=3)\n"
          "print('R', deep(context='some text', query='inner?').answer)\n"
          "print('B', llm_query_batched(['b1?', 'b2?']))\n")
DONE = "SUBMIT(counts={'a': 1})"


def _sub(request):
    """The sub-model: a nested RLM's turn, a dspy sub-agent's fields, or a plain llm_query answer."""
    text = chat(request)
    if ITERATION.search(text):
        return fields(reasoning="deep", code="```python\nprint(llm_query('innermost?'))\nSUBMIT(answer='deep')\n```")
    if "[[ ## answer ## ]]" in text:
        return fields(reasoning="thought", answer="sub-agent answer")
    return "plain answer"


def _run(tmp_path, cells, *extra):
    with OpenAIServer(reply=root_for(cells)) as root, OpenAIServer(reply=_sub) as sub:
        done = cli(["task=needles", "task.documents=2", "task.doc_chars=200", "task.needles=2", "model=local",
                    f"model.api_base={root.url}", "model.model=openai/root", "model.sub.model=openai/sub",
                    f"model.sub.api_base={sub.url}", f"model.input_cost_per_mtok={PRICE_IN}",
                    f"model.output_cost_per_mtok={PRICE_OUT}", "limits.max_cost_usd=1000",
                    "orchestration.prefect=false", *extra], tmp_path, timeout=300)
        calls = SimpleNamespace(root=len(root.requests), sub=len(sub.requests))
    run_dir = run_dir_of(tmp_path)
    tree = json.loads((run_dir / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return done, tree, summary, calls


def _calls(tree):
    return [c for c in tree["root"]["children"] if c["kind"] == "llm_call"]


def test_sub_agent_calls_are_recorded_costed_and_counted_against_max_llm_calls(tmp_path):
    done, tree, summary, calls = _run(tmp_path, [SUB_AGENTS, MORE.format(n=3), DONE], "limits.max_llm_calls=4")
    assert done.returncode == 3, done.stderr[-2000:]  # partial: calls were refused
    nodes = _calls(tree)
    # every sub-model request is one recorded node, labelled with the API it came through
    assert len(nodes) == calls.sub == 4
    assert [n["api"] for n in nodes] == ["dspy.Predict", "dspy.ChainOfThought", "llm_query", "dspy.Predict"]
    first = nodes[0]
    assert "first?" in first["task"] and "sub-agent answer" in first["result"] and first["status"] == "ok"
    usage = first["usage"]["own"]
    assert usage["llm_calls"] == 1 and usage["tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert usage["cost_usd"] == round((usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT)
                                      / 1e6, 6)
    # the summary counts them, and the agent's total is not counted twice
    assert summary["llm_calls"] == calls.root + calls.sub
    sub_tokens = sum(n["usage"]["own"]["tokens"] for n in nodes)
    assert tree["root"]["usage"]["total"]["tokens"] == summary["tokens"] > sub_tokens
    # the 5th and 6th call were refused by limits.max_llm_calls: the model saw why, the run says partial
    second = tree["root"]["iterations"][1]["stdout"]
    assert second.count("REFUSED") == 2 and "LLM call limit exceeded" in second and "limits.max_llm_calls" in second
    assert tree["status"] == summary["status"] == "partial"
    assert summary["partial"]["refused"] == {"max_llm_calls": 2}


def test_a_sub_agent_call_after_the_token_budget_is_spent_is_refused(tmp_path):
    done, tree, summary, calls = _run(tmp_path, [SUB_AGENTS + MORE.format(n=30), DONE], "limits.max_tokens=4000")
    stdout = tree["root"]["iterations"][0]["stdout"]
    assert calls.sub < 33, "every sub-agent call was made past limits.max_tokens"
    assert "REFUSED" in stdout and "limits.max_tokens" in stdout and "dspy.Predict" in stdout
    assert len(_calls(tree)) == calls.sub
    assert tree["status"] == "budget_exceeded" and "limits.max_tokens" in tree["error"]
    assert tree["root"]["refused"]["reasons"]["max_tokens"] >= 1
    assert done.returncode == 1


def test_a_nested_rlm_sub_agent_is_recorded_and_budgeted(tmp_path):
    done, tree, summary, calls = _run(tmp_path, [NESTED, DONE])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "R deep" in tree["root"]["iterations"][0]["stdout"]
    nodes = _calls(tree)
    assert len(nodes) == calls.sub == 4  # the nested RLM's turn and its own llm_query; a batch of two
    assert sorted(n["api"] for n in nodes) == ["dspy.RLM", "dspy.RLM", "llm_query_batched", "llm_query_batched"]
    assert any(n["task"] == "innermost?" and n["result"] == "plain answer" for n in nodes)
    assert summary["llm_calls"] == calls.root + calls.sub
    assert tree["usage"]["sandboxes"] == 2 and tree["root"]["sandbox_id"]


HOSTILE = "<img src=x onerror=window.__pwned=1>\"><svg onload=window.__pwned=1>"


def test_the_viewer_shows_each_call_with_its_api_escaped(tmp_path):
    """Real Chromium over a real run's bundle: each sandbox call is listed with the API it came through, its
    tokens and cost; a hostile `api` value in run.json stays text."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium) and not os.environ.get("CI"):
        pytest.skip("Debian's chromium is not installed (bash scripts/install.sh installs it)")
    from playwright.sync_api import sync_playwright

    from rlm_pipelines.viewer import write_bundle

    done, tree, summary, calls = _run(tmp_path, [SUB_AGENTS, DONE])
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = run_dir_of(tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    record["root"]["children"][-1]["api"] = HOSTILE
    (run_dir / "run.json").write_text(json.dumps(record))
    write_bundle(run_dir)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                    "--allow-file-access-from-files"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{run_dir}/viewer/index.html")
        page.wait_for_selector("#calls .call")
        apis = page.locator("#calls .call .api").all_text_contents()
        meta = page.locator("#calls .call .meta").first.text_content()
        pwned = page.evaluate("typeof window.__pwned")
        images = page.locator("#calls img").count()
        browser.close()
    assert apis == ["dspy.Predict", "dspy.ChainOfThought", HOSTILE]
    first = tree["root"]["children"][0]["usage"]["own"]
    assert f"{first['tokens']} tokens" in meta and f"${first['cost_usd']:.4f}" in meta
    assert pwned == "undefined" and images == 0 and errors == []
