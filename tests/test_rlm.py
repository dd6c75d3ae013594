"""A real dspy.RLM loop, end to end, in the bubblewrap sandbox: scripted model offline, and real HTTP."""

import json
import threading

import dspy
import pytest

from rlm_pipelines.config import LocalSandboxConfig, ModelSpec
from rlm_pipelines.engines.rlm import SandboxRLM
from rlm_pipelines.models import UsageLedger, build_dspy_lm
from rlm_pipelines.models.scripted import Turn, TurnScript, register_script
from tests.fakes.openai_server import OpenAIServer

SANDBOX = LocalSandboxConfig(isolation="bwrap")
DOCS = [f"Document {i}: the colour of box {i} is {'red' if i % 3 == 0 else 'blue'}." for i in range(40)]

TURNS = [
    Turn("print(len(documents), 'documents'); print(documents[0])", "Look at the input first."),
    # a recoverable mistake: the model misnames a variable and sees the NameError
    Turn("print(docs[0])", "Peek again."),
    Turn("prompts = ['Colour in: ' + d for d in documents]\n"
         "answers = llm_query_batched(prompts)\n"
         "print(answers[:3])", "Ask the sub-model about every document at once."),
    Turn("import collections\ncounts = dict(collections.Counter(answers))\nprint(counts)", "Aggregate."),
    Turn("SUBMIT(counts=counts, total=len(answers))", "Done."),
]


def colour(prompt):
    return "red" if " red." in prompt else "blue"


def run_rlm(lm, sub_lm, **kwargs):
    rlm = SandboxRLM("documents: list[str], question: str -> counts: dict[str, int], total: int",
                     sandbox=SANDBOX, max_iters=8, max_llm_calls=100, sub_lm=sub_lm, **kwargs)
    with dspy.context(lm=lm):
        return rlm(documents=DOCS, question="How many boxes of each colour?")


def test_scripted_rlm_end_to_end_in_the_sandbox():
    register_script("rlm-e2e", TurnScript(TURNS, sub_answer=colour))
    ledger = UsageLedger()
    pred = run_rlm(build_dspy_lm(ModelSpec(model="scripted/rlm-e2e"), ledger),
                   build_dspy_lm(ModelSpec(model="scripted/rlm-e2e.sub"), ledger))
    assert pred.counts == {"red": 14, "blue": 26}
    assert pred.total == 40
    steps = pred.trajectory
    assert len(steps) == 5
    assert "NameError" in steps[1]["output"]  # the error went back to the model ...
    assert "40 documents" in steps[0]["output"]
    assert "['red', 'blue', 'blue']" in steps[2]["output"]  # ... and on
    snap = ledger.snapshot()
    assert snap["by_model"]["scripted/rlm-e2e.sub"]["calls"] == 40
    assert snap["by_model"]["scripted/rlm-e2e"]["calls"] == 5


def test_batched_fan_out_is_wider_than_dspys_eight():
    barrier = threading.Barrier(24, timeout=30)

    def meet(prompt):
        barrier.wait()  # passes only when 24 sub-calls are in flight together
        return colour(prompt)

    register_script("rlm-wide", TurnScript([
        Turn("answers = llm_query_batched(['Colour in: ' + d for d in documents[:24]])\nprint(len(answers))"),
        Turn("SUBMIT(counts={'n': len(answers)}, total=len(answers))")], sub_answer=meet))
    pred = run_rlm(build_dspy_lm(ModelSpec(model="scripted/rlm-wide")),
                   build_dspy_lm(ModelSpec(model="scripted/rlm-wide.sub")), batch_concurrency=32)
    assert pred.total == 24
    assert "[ERROR]" not in pred.trajectory[0]["output"]


def test_call_budget_is_reserved_for_a_whole_batch_at_once():
    ledger = UsageLedger()
    register_script("rlm-budget", TurnScript([
        Turn("try:\n    llm_query_batched(['Colour in: ' + d for d in documents])\n"
             "except Exception as e:\n    print('refused:', e)"),
        Turn("SUBMIT(counts={}, total=0)")], sub_answer=colour))
    rlm = SandboxRLM("documents: list[str], question: str -> counts: dict[str, int], total: int",
                     sandbox=SANDBOX, max_iters=4, max_llm_calls=10,
                     sub_lm=build_dspy_lm(ModelSpec(model="scripted/rlm-budget.sub"), ledger))
    with dspy.context(lm=build_dspy_lm(ModelSpec(model="scripted/rlm-budget"))):
        pred = rlm(documents=DOCS, question="q")
    assert "LLM call limit exceeded" in pred.trajectory[0]["output"]
    assert ledger.snapshot()["calls"] == 0  # not one call of the 40 was made


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("RLM_TEST_KEY", "sk-test")
    return "RLM_TEST_KEY"


def test_reply_without_code_is_an_observation_not_a_crash(key):
    def reply(request):
        # iteration 1: prose with no code (dspy also retries it through its JSON adapter); then SUBMIT
        if "1/8" in json.dumps(request["messages"]):
            return "I think the answer is blue."
        return ("[[ ## reasoning ## ]]\nok\n\n[[ ## code ## ]]\nSUBMIT(counts={'blue': 1}, total=1)\n\n"
                "[[ ## completed ## ]]")

    with OpenAIServer(reply=reply) as server:
        lm = build_dspy_lm(ModelSpec(model="openai/fake-rlm", api_base=server.url, api_key_env=key))
        pred = run_rlm(lm, lm)
    assert pred.total == 1
    first = pred.trajectory[0]["output"]
    assert "no `code` field" in first
    assert "blue" in first


def test_rlm_over_real_http_with_sub_model_on_the_host(key):
    """The real provider path: root and sub-model are HTTP endpoints; sandbox code reaches the sub-model only
    through the host bridge (the sandbox has no network)."""

    def root(request):
        text = json.dumps(request["messages"])
        step = text.count("=== Step")
        code = ("print(llm_query('Colour in: ' + documents[0]))" if step == 0 else
                "SUBMIT(counts={'red': 1}, total=1)")
        return f"[[ ## reasoning ## ]]\nstep {step}\n\n[[ ## code ## ]]\n{code}\n\n[[ ## completed ## ]]"

    with OpenAIServer(reply=root) as root_server, \
            OpenAIServer(reply=lambda req: colour(req["messages"][-1]["content"])) as sub_server:
        lm = build_dspy_lm(ModelSpec(model="openai/fake-root", api_base=root_server.url, api_key_env=key))
        sub = build_dspy_lm(ModelSpec(model="openai/fake-sub", api_base=sub_server.url, api_key_env=key))
        pred = run_rlm(lm, sub)
    assert pred.total == 1
    assert pred.trajectory[0]["output"].strip() == "red"
    assert len(sub_server.requests) == 1
    assert "Document 0" in json.dumps(sub_server.requests[0]["body"])
