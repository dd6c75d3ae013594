"""The model layer against a real OpenAI-compatible HTTP server on 127.0.0.1, and the offline provider."""

import asyncio
import logging
import threading

import pytest

from rlm_pipelines.config import ModelSpec, SubModelSpec
from rlm_pipelines.models import (LLMClient, MissingKeyError, ModelError, UsageLedger, build_dspy_lm, check_key,
                                  sub_spec)
from rlm_pipelines.models.scripted import Turn, TurnScript, register_script
from tests.fakes.openai_server import OpenAIServer

KEY_ENV = "RLM_TEST_FAKE_KEY"
SECRET = "sk-test-secret-123"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with OpenAIServer(reply=lambda req: "reply to " + req["messages"][-1]["content"][:20]) as srv:
        yield srv


def spec_for(server, **overrides):
    fields = dict(model="openai/fake-model-a", api_key_env=KEY_ENV, api_base=server.url, num_retries=2,
                  retry_base_s=0.01, input_cost_per_mtok=2.0, output_cost_per_mtok=8.0)
    fields.update(overrides)
    return ModelSpec(**fields)


def priced(record, spec):
    return (record.prompt_tokens * spec.input_cost_per_mtok
            + record.completion_tokens * spec.output_cost_per_mtok) / 1e6


def call(path, spec, ledger=None, prompt="x"):
    """One call on either path: litellm (repo engine) or dspy.LM (document engine)."""
    if path == "litellm":
        return LLMClient(spec, ledger).complete(prompt).text
    return build_dspy_lm(spec, ledger)(prompt)[0]


# --------------------------------------------------------------------------- real HTTP


def test_litellm_path_real_http_usage_cost_and_key(server):
    ledger, seen = UsageLedger(), []
    ledger.listener = seen.append
    spec = spec_for(server)
    out = LLMClient(spec, ledger).complete("hello there")
    assert out.text == "reply to hello there"
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "fake-model-a"
    assert request["headers"]["authorization"] == f"Bearer {SECRET}"
    assert out.prompt_tokens > 0
    assert out.completion_tokens > 0
    assert out.cost_usd == pytest.approx(priced(out, spec))
    snap = ledger.snapshot()
    assert snap["calls"] == 1
    assert snap["errors"] == 0
    assert snap["cost_usd"] == pytest.approx(out.cost_usd, abs=1e-6)
    assert snap["tokens"] == out.prompt_tokens + out.completion_tokens
    assert seen == ledger.records
    assert seen[0].ok
    assert seen[0].duration_s > 0
    assert SECRET not in repr(ledger.records)
    assert SECRET not in repr(snap)


def test_dspy_lm_path_real_http_records_usage(server):
    ledger = UsageLedger()
    spec = spec_for(server, model="openai/fake-model-b")
    lm = build_dspy_lm(spec, ledger, role="root")
    assert lm.engine == "litellm"
    assert lm.cache is False
    assert lm("what is up")[0] == "reply to what is up"
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    record = ledger.records[-1]
    assert record.ok
    assert record.prompt_tokens > 0
    assert record.role == "root"
    assert record.cost_usd == pytest.approx(priced(record, spec))
    assert lm.last_call()["outputs"] == ["reply to what is up"]
    assert SECRET not in repr(ledger.records)
    assert SECRET not in repr(lm.last_call())


def test_dspy_lm_usage_is_per_call_even_with_history_disabled(server):
    """dspy skips its history hook when history is off; usage must still be this call's, never the last."""
    import dspy

    ledger = UsageLedger()
    lm = build_dspy_lm(spec_for(server, model="openai/fake-model-c"), ledger)
    lm("long prompt " * 200)
    with dspy.context(disable_history=True):
        lm("short")
    long, short = ledger.records
    assert long.prompt_tokens > 500
    assert 0 < short.prompt_tokens < 20


def test_dspy_lm_async_calls_are_retried_and_recorded(server):
    server.fail(503)
    ledger = UsageLedger()
    lm = build_dspy_lm(spec_for(server, model="openai/fake-model-async"), ledger)

    async def both():
        return await asyncio.gather(lm.acall("a" * 40), lm.acall("b" * 80))

    first, second = asyncio.run(both())
    assert (first[0], second[0]) == ("reply to " + "a" * 20, "reply to " + "b" * 20)
    assert len(server.requests) == 3
    assert sorted(r.attempts for r in ledger.records) == [1, 2]
    # interleaved on one event loop, each call still gets its own usage (the server counts chars/4 + 1)
    assert sorted(r.prompt_tokens for r in ledger.records) == [11, 21]
    assert all(r.cost_usd > 0 for r in ledger.records)


@pytest.mark.parametrize("path", ["litellm", "dspy"])
@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_error_then_success_is_retried(server, path, status):
    server.fail(status)
    ledger = UsageLedger()
    assert call(path, spec_for(server, model=f"openai/fake-{status}-{path}"), ledger, "again") == "reply to again"
    assert len(server.requests) == 2
    assert ledger.records[-1].ok
    assert ledger.records[-1].attempts == 2


@pytest.mark.parametrize("path", ["litellm", "dspy"])
def test_500_forever_fails_after_retries_with_provider_message(server, path):
    server.fail_always(500)
    ledger = UsageLedger()
    spec = spec_for(server, model=f"openai/fake-500-{path}", num_retries=2)
    with pytest.raises(ModelError, match="fake-500.*after 3 attempts.*fake provider error 500") as error:
        call(path, spec, ledger)
    assert error.value.attempts == 3
    assert error.value.transient  # the pipeline may retry its step later
    assert len(server.requests) == 3
    assert ledger.records[-1].ok is False
    assert ledger.records[-1].attempts == 3
    assert ledger.snapshot()["errors"] == 1


@pytest.mark.parametrize("path", ["litellm", "dspy"])
@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_fast(server, path, status):
    server.fail_always(status)
    ledger = UsageLedger()
    with pytest.raises(ModelError, match=f"fake provider error {status}") as error:
        call(path, spec_for(server, model=f"openai/fake-{status}-{path}", num_retries=3), ledger)
    assert not error.value.transient
    assert len(server.requests) == 1
    assert SECRET not in str(error.value)
    assert SECRET not in repr(ledger.records)


def test_no_retry_starts_after_the_deadline(server):
    import time

    server.fail_always(500)
    client = LLMClient(spec_for(server, model="openai/fake-deadline", num_retries=5, retry_base_s=10))
    started = time.monotonic()
    with pytest.raises(ModelError):
        client.complete("x", deadline=time.monotonic() + 1)
    assert len(server.requests) == 1
    assert time.monotonic() - started < 1


def test_unpriced_model_costs_zero_with_one_warning(server, caplog):
    client = LLMClient(spec_for(server, model="openai/fake-unpriced", input_cost_per_mtok=None,
                                output_cost_per_mtok=None))
    with caplog.at_level(logging.WARNING, logger="rlm_pipelines.models.litellm_client"):
        assert client.complete("a").cost_usd == 0.0
        assert client.complete("b").cost_usd == 0.0
    warnings = [r for r in caplog.records if "no price known" in r.getMessage()]
    assert len(warnings) == 1
    assert "openai/fake-unpriced" in warnings[0].getMessage()


def test_ledger_is_thread_safe(server):
    server.latency_s = 0.05
    ledger, seen = UsageLedger(), []
    ledger.listener = seen.append
    client = LLMClient(spec_for(server, model="openai/fake-parallel"), ledger)
    threads = [threading.Thread(target=client.complete, args=(f"prompt {i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = ledger.snapshot()
    assert snap["calls"] == len(seen) == 16
    assert snap["by_model"]["openai/fake-parallel"]["calls"] == 16
    assert snap["cost_usd"] == pytest.approx(sum(r.cost_usd for r in ledger.records), abs=1e-6)


# --------------------------------------------------------------------------- keys and sub-models


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    spec = ModelSpec(model="openrouter/google/gemini-3-flash-preview", api_key_env="OPENROUTER_API_KEY")
    with pytest.raises(MissingKeyError, match="export OPENROUTER_API_KEY="):
        check_key(spec)
    monkeypatch.setenv("OPENROUTER_API_KEY", "")  # set but empty is missing too
    with pytest.raises(MissingKeyError, match="OPENROUTER_API_KEY"):
        check_key(spec)
    sub_needs_key = ModelSpec(model="scripted/x", sub=SubModelSpec(model="openai/gpt-x", api_key_env="OPENAI_API_KEY"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="OPENAI_API_KEY"):
        check_key(sub_needs_key)
    check_key(ModelSpec(model="scripted/x"))  # no key needed


def test_sub_spec_defaults_to_the_parent():
    parent = ModelSpec(model="openai/big", api_key_env="K", temperature=0.3, max_tokens=100)
    assert sub_spec(parent) is parent
    child = sub_spec(ModelSpec(model="openai/big", api_key_env="K", sub=SubModelSpec(model="openai/small",
                                                                                      max_tokens=50)))
    assert (child.model, child.max_tokens, child.api_key_env, child.temperature) == ("openai/small", 50, "K", 0.0)
    assert sub_spec(child) is child  # a sub-model has no sub-model of its own


# --------------------------------------------------------------------------- the scripted provider


def test_scripted_provider_offline_and_deterministic():
    import litellm

    register_script("unit", TurnScript([Turn("x = 1", "first"), "SUBMIT(answer=x)"],
                                       sub_answer=lambda prompt: f"{len(prompt)} chars"))
    sub = LLMClient(ModelSpec(model="scripted/unit.sub"))
    assert sub.complete("abcd").text == sub.complete("abcd").text == "4 chars"
    assert build_dspy_lm(ModelSpec(model="scripted/unit.sub"))("hello")[0] == "5 chars"

    raw = litellm.completion(model="scripted/unit.sub", messages=[{"role": "user", "content": "x" * 400}])
    assert raw.model == "scripted"
    assert raw.usage.prompt_tokens == 100

    root = LLMClient(ModelSpec(model="scripted/unit"))
    chat = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "..."},
            {"role": "user", "content": "output"}]
    assert root.complete(chat).text == root.complete(chat).text == "```python\nSUBMIT(answer=x)\n```"
    assert root.complete("[iteration 1/5]\nYour task").text == "first\n\n```python\nx = 1\n```"
    assert "no turn 3" in root.complete("[iteration 3/5]\nstill going").text


def test_scripted_root_speaks_dspys_chat_adapter():
    import dspy

    register_script("fields", TurnScript([Turn("x = 1", "first"), Turn("SUBMIT(answer=x)", "second")]))
    predict = dspy.Predict("iteration: str -> reasoning: str, code: str")
    with dspy.context(lm=build_dspy_lm(ModelSpec(model="scripted/fields"))):
        pred = predict(iteration="2/5")
    assert pred.reasoning == "second"
    assert "SUBMIT(answer=x)" in pred.code


def test_scripted_rlm_runs_concurrently_without_interfering():
    """Turns come from the prompt (dspy's `iteration` field), so two RLM runs of one script in parallel
    each get every turn in order; sub-calls go to the `.sub` model."""
    import dspy
    from dspy.primitives.local_interpreter import LocalInterpreter

    register_script("rlm-unit", TurnScript([
        Turn("words = text.split()\nprint(len(words))", "Count."),
        Turn("shout = llm_query('upper: ' + text)\nprint(shout)", "Ask."),
        Turn("SUBMIT(answer=f'{len(words)} {shout}')", "Done."),
    ], sub_answer=lambda prompt: prompt.removeprefix("upper: ").upper()))
    ledger = UsageLedger()
    root, sub = build_dspy_lm(ModelSpec(model="scripted/rlm-unit"), ledger), \
        build_dspy_lm(ModelSpec(model="scripted/rlm-unit.sub"), ledger)
    results = {}

    def run(text):
        rlm = dspy.RLM("text: str -> answer: str", max_iters=5, sub_lm=sub, interpreter_factory=LocalInterpreter)
        with dspy.context(lm=root):
            results[text] = rlm(text=text).answer

    threads = [threading.Thread(target=run, args=(text,)) for text in ("a b c", "hello there")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a b c": "3 A B C", "hello there": "2 HELLO THERE"}
    by_model = ledger.snapshot()["by_model"]
    assert by_model["scripted/rlm-unit"]["calls"] == 6
    assert by_model["scripted/rlm-unit.sub"]["calls"] == 2


def test_unknown_script_is_a_clear_error_not_retried():
    with pytest.raises(ModelError, match="no scripted model named 'nope'") as error:
        LLMClient(ModelSpec(model="scripted/nope", num_retries=3)).complete("x")
    assert error.value.attempts == 1
    assert not error.value.transient


def test_fake_server_streams_server_sent_events(server):
    import litellm

    chunks = litellm.completion(model="openai/fake-stream", api_base=server.url, api_key=SECRET, stream=True,
                                messages=[{"role": "user", "content": "stream me"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "reply to stream me"
    assert server.requests[-1]["body"]["stream"] is True


def test_usage_maps_the_ledger_and_a_completion_to_the_run_tree():
    from rlm_pipelines.models import CallRecord, Completion, Usage
    from rlm_pipelines.tree import USAGE_KEYS

    ledger = UsageLedger()
    ledger.add(CallRecord("m", prompt_tokens=10, completion_tokens=5, cost_usd=0.1))
    before = Usage.from_snapshot(ledger.snapshot())
    ledger.add(CallRecord("m", prompt_tokens=3, completion_tokens=2, cost_usd=0.2))
    after = Usage.from_snapshot(ledger.snapshot())
    assert tuple(after.as_tree()) == USAGE_KEYS
    assert after.as_tree() == {"prompt_tokens": 13, "completion_tokens": 7, "tokens": 20, "cost_usd": 0.3,
                               "llm_calls": 2}
    assert after.minus(before).as_tree() == {"prompt_tokens": 3, "completion_tokens": 2, "tokens": 5,
                                             "cost_usd": 0.2, "llm_calls": 1}  # 0.3 - 0.1, rounded
    one = Usage.from_completion(Completion("hi", "m", prompt_tokens=4, completion_tokens=1, cost_usd=0.5, attempts=2))
    assert one.as_tree() == {"prompt_tokens": 4, "completion_tokens": 1, "tokens": 5, "cost_usd": 0.5, "llm_calls": 1}


def test_the_sub_model_can_drop_stop_sequences_and_reasoning_effort(server):
    """A reasoning main model's settings are inherited by llm_query's model unless its `sub` unsets them
    ([] and ""), e.g. for a cheap sub-model that rejects reasoning_effort."""
    from dataclasses import replace

    from rlm_pipelines.models.litellm_client import sub_spec

    spec = replace(spec_for(server), stop=["</answer>"], reasoning_effort="high")
    LLMClient(spec).complete("main")
    sent = server.requests[-1]["body"]
    assert sent["stop"] == ["</answer>"] and sent["reasoning_effort"] == "high"
    LLMClient(sub_spec(replace(spec, sub=SubModelSpec(max_tokens=77)))).complete("sub inherits")
    sent = server.requests[-1]["body"]
    assert sent["stop"] == ["</answer>"] and sent["reasoning_effort"] == "high" and sent["max_tokens"] == 77
    LLMClient(sub_spec(replace(spec, sub=SubModelSpec(stop=[], reasoning_effort="")))).complete("sub drops")
    sent = server.requests[-1]["body"]
    assert "stop" not in sent and "reasoning_effort" not in sent


def test_dspy_lm_async_calls_go_through_the_call_store(server, tmp_path):
    """acall records into calls.jsonl and the cache like a sync call; a second LM answers the same prompts
    from the cache, free, with no request to the server."""
    import json

    from rlm_pipelines.models.callstore import Calls, DiskCache

    spec = spec_for(server, model="openai/fake-model-store")
    cache = DiskCache(tmp_path / "cache")

    async def both(lm):
        return await asyncio.gather(lm.acall("a" * 40), lm.acall("b" * 80))

    first_ledger, second_ledger = UsageLedger(), UsageLedger()
    first = asyncio.run(both(build_dspy_lm(spec, first_ledger, calls=Calls(tmp_path / "one.jsonl", cache=cache))))
    sent = len(server.requests)
    second = asyncio.run(both(build_dspy_lm(spec, second_ledger, calls=Calls(tmp_path / "two.jsonl", cache=cache))))
    assert second == first and len(server.requests) == sent == 2
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [e["origin"] for e in one] == ["live", "live"] and [e["origin"] for e in two] == ["cached", "cached"]
    assert sorted(e["key"] for e in one) == sorted(e["key"] for e in two)
    assert second_ledger.snapshot()["cached_calls"] == 2 and second_ledger.snapshot()["cost_usd"] == 0
    assert second_ledger.snapshot()["saved_usd"] == pytest.approx(first_ledger.snapshot()["cost_usd"])
