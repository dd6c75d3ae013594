"""The model layer against a real OpenAI-compatible HTTP server on 127.0.0.1, and the offline provider."""

import pytest

from rlm_pipelines.config import ModelSpec, SubModelSpec
from rlm_pipelines.models import LLMClient, MissingKeyError, ModelError, UsageLedger, build_dspy_lm, check_key
from rlm_pipelines.models import litellm_client
from rlm_pipelines.models.scripted import Turn, TurnScript, register_script
from tests.fakes.openai_server import OpenAIServer

KEY_ENV = "RLM_TEST_FAKE_KEY"
SECRET = "sk-test-secret-123"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.setattr(litellm_client, "RETRY_BASE_S", 0.01)
    with OpenAIServer(reply=lambda req: "reply to " + req["messages"][-1]["content"][:20]) as srv:
        yield srv


def spec_for(server, **overrides):
    fields = dict(model="openai/fake-model-a", api_key_env=KEY_ENV, api_base=server.url, num_retries=2,
                  input_cost_per_mtok=2.0, output_cost_per_mtok=8.0)
    fields.update(overrides)
    return ModelSpec(**fields)


def test_litellm_path_real_http_usage_cost_and_key(server):
    ledger = UsageLedger()
    out = LLMClient(spec_for(server), ledger).complete("hello there")
    assert out.text == "reply to hello there"
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert out.prompt_tokens > 0 and out.completion_tokens > 0
    expected = (out.prompt_tokens * 2.0 + out.completion_tokens * 8.0) / 1e6
    assert out.cost_usd == pytest.approx(expected)
    snap = ledger.snapshot()
    assert snap["calls"] == 1 and snap["cost_usd"] == pytest.approx(expected, abs=1e-6)
    assert SECRET not in repr(ledger.as_dicts()) and SECRET not in repr(snap)


def test_dspy_lm_path_real_http_records_usage(server):
    ledger = UsageLedger()
    lm = build_dspy_lm(spec_for(server, model="openai/fake-model-b"), ledger)
    assert lm("what is up")[0] == "reply to what is up"
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    record = ledger.records[-1]
    assert record.ok and record.prompt_tokens > 0
    assert record.cost_usd == pytest.approx((record.prompt_tokens * 2.0 + record.completion_tokens * 8.0) / 1e6)


@pytest.mark.parametrize("path", ["litellm", "dspy"])
def test_429_then_success_is_retried(server, path):
    server.fail(429)
    spec = spec_for(server, model=f"openai/fake-429-{path}")
    if path == "litellm":
        assert LLMClient(spec).complete("again").text == "reply to again"
    else:
        assert build_dspy_lm(spec)("again")[0] == "reply to again"
    assert len(server.requests) == 2


@pytest.mark.parametrize("path", ["litellm", "dspy"])
def test_500_forever_fails_after_retries_with_provider_message(server, path):
    server.fail_always(500)
    ledger = UsageLedger()
    spec = spec_for(server, model=f"openai/fake-500-{path}", num_retries=2)
    call = (lambda: LLMClient(spec, ledger).complete("x")) if path == "litellm" else \
        (lambda: build_dspy_lm(spec, ledger)("x"))
    with pytest.raises(ModelError, match="after 3 attempts.*fake provider error 500"):
        call()
    assert len(server.requests) == 3
    assert ledger.records[-1].ok is False and ledger.records[-1].attempts == 3


@pytest.mark.parametrize("path", ["litellm", "dspy"])
def test_401_fails_fast(server, path):
    server.fail_always(401)
    spec = spec_for(server, model=f"openai/fake-401-{path}", num_retries=3)
    call = (lambda: LLMClient(spec).complete("x")) if path == "litellm" else (lambda: build_dspy_lm(spec)("x"))
    with pytest.raises(ModelError, match="fake provider error 401"):
        call()
    assert len(server.requests) == 1


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    spec = ModelSpec(model="openrouter/google/gemini-3-flash-preview", api_key_env="OPENROUTER_API_KEY")
    with pytest.raises(MissingKeyError, match="export OPENROUTER_API_KEY="):
        check_key(spec)
    sub_needs_key = ModelSpec(model="scripted/x", sub=SubModelSpec(model="openai/gpt-x", api_key_env="OPENAI_API_KEY"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="OPENAI_API_KEY"):
        check_key(sub_needs_key)


def test_scripted_provider_offline_and_deterministic():
    import dspy

    register_script("unit", TurnScript([Turn("x = 1", "first"), Turn("SUBMIT(answer=x)", "second")],
                                       sub_answer=lambda prompt: f"{len(prompt)} chars"))
    client = LLMClient(ModelSpec(model="scripted/unit.sub"))
    assert client.complete("abcd").text == client.complete("abcd").text == "4 chars"
    chat = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "..."},
            {"role": "user", "content": "output"}]
    assert "SUBMIT(answer=x)" in LLMClient(ModelSpec(model="scripted/unit")).complete(chat).text
    lm = build_dspy_lm(ModelSpec(model="scripted/unit.sub"))
    assert lm("hello")[0] == "5 chars"

    # the root script speaks dspy's ChatAdapter format: a Predict with reasoning + code parses it
    predict = dspy.Predict("iteration: str -> reasoning: str, code: str")
    with dspy.context(lm=build_dspy_lm(ModelSpec(model="scripted/unit"))):
        pred = predict(iteration="2/5")
    assert pred.reasoning == "second" and "SUBMIT(answer=x)" in pred.code


def test_unknown_script_is_a_clear_error():
    with pytest.raises(ModelError, match="no scripted model named 'nope'"):
        LLMClient(ModelSpec(model="scripted/nope", num_retries=0)).complete("x")
