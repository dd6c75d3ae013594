"""dspy parity on the host side of the interpreter (issue 12, points 1, 3, 4, 6, 9): what a dspy user relies
on from dspy's own interpreters, checked on `SandboxInterpreter` over a real bubblewrap sandbox, and through
`dspy.RLM` with a scripted model where the point is about RLM."""

import asyncio
import collections
import dataclasses
import datetime
import enum
import json
import threading

import dspy
import pydantic
import pytest
from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError, FinalOutput
from dspy.utils.callback import BaseCallback

from rlm_pipelines.config import LocalSandboxConfig, ModelSpec, ReplConfig
from rlm_pipelines.engines.interpreter import SandboxInterpreter, SandboxInterpreterFactory
from rlm_pipelines.models import build_dspy_lm
from rlm_pipelines.models.scripted import Turn, TurnScript, register_script

CONFIG = LocalSandboxConfig(isolation="bwrap", repl=ReplConfig(cell_timeout_s=20))
FACTORY = SandboxInterpreterFactory(CONFIG)


@pytest.fixture
def interp():
    interpreter = FACTORY()
    yield interpreter
    interpreter.shutdown()


def scripted_rlm(name, turns, signature, **kwargs):
    register_script(name, TurnScript([Turn(code) for code in turns]))
    lm = build_dspy_lm(ModelSpec(model=f"scripted/{name}"))
    return dspy.RLM(signature, max_iters=len(turns), interpreter_factory=FACTORY, **kwargs), lm


# -- point 1: async host tools are awaited, with dspy's context kept


class ToolCalls(BaseCallback):
    """A dspy callback: it only fires if dspy's settings (where callbacks live) reached the tool."""

    def __init__(self):
        self.started = []

    def on_tool_start(self, call_id, instance, inputs):
        self.started.append((instance.name, dict(inputs.get("kwargs") or inputs)))


async def add(a: int, b: int) -> int:
    """Add two numbers, after a real await."""
    await asyncio.sleep(0.01)
    return a + b + dspy.settings.get("offset", 0)  # a dspy.context value, read inside the awaited tool


ASYNC_TURNS = ["print(add(a=2, b=3))", "SUBMIT(total=add(a=n, b=1))"]


def test_async_tool_through_rlm_forward_sees_dspy_context():
    rlm, lm = scripted_rlm("parity-async", ASYNC_TURNS, "n: int -> total: int", tools=[add])
    calls = ToolCalls()
    with dspy.context(lm=lm, offset=100, callbacks=[calls]):
        pred = rlm(n=40)
    assert pred.total == 141
    assert pred.trajectory[0]["output"].strip() == "105"
    assert [name for name, _ in calls.started] == ["add", "add"]


def test_async_tool_through_rlm_aforward_sees_dspy_context():
    rlm, lm = scripted_rlm("parity-aasync", ASYNC_TURNS, "n: int -> total: int", tools=[add])
    calls = ToolCalls()

    async def main():
        with dspy.context(lm=lm, offset=1000, callbacks=[calls]):
            return await rlm.aforward(n=7)

    pred = asyncio.run(main())
    assert pred.total == 1008
    assert pred.trajectory[0]["output"].strip() == "1005"
    assert len(calls.started) == 2


def test_async_tool_on_the_interpreter_directly(interp):
    async def fetch(key):
        await asyncio.sleep(0)
        return {"key": key, "tags": {"b", "a"}}

    interp.tools["fetch"] = fetch
    assert json.loads(interp.execute("import json; print(json.dumps(fetch('k')))")) == {"key": "k",
                                                                                          "tags": ["a", "b"]}


class InterpreterEvents(BaseCallback):
    """dspy's interpreter callbacks, recorded in order."""

    def __init__(self):
        self.events = []

    def on_interpreter_startup_start(self, call_id, instance, inputs):
        self.events.append("startup")

    def on_interpreter_execute_start(self, call_id, instance, inputs):
        self.events.append(("execute", inputs["code"]))

    def on_interpreter_tool_call_start(self, call_id, instance, inputs):
        self.events.append(("tool", inputs["tool_name"], inputs["args"], dspy.settings.get("offset")))

    def on_interpreter_tool_call_end(self, call_id, outputs, exception=None):
        self.events.append(("tool done", outputs))

    def on_interpreter_execute_end(self, call_id, outputs, exception=None):
        self.events.append(("executed", outputs))

    def on_interpreter_shutdown_start(self, call_id, instance, inputs):
        self.events.append("shutdown")


def test_interpreter_callbacks_see_awaited_tool_calls():
    events = InterpreterEvents()
    interp = SandboxInterpreter(CONFIG, tools={"add": add})
    try:
        with dspy.context(callbacks=[events], offset=1):
            assert interp.execute("print(add(2, 3))") == "6"
    finally:
        interp.shutdown()
    # The sandbox starts lazily, inside the first execute (as dspy's LocalInterpreter does); shutdown ran
    # outside the context, so it is not seen.
    assert events.events == [("execute", "print(add(2, 3))"), "startup", ("tool", "add", [2, 3], 1),
                             ("tool done", 6), ("executed", "6")]
    local = InterpreterEvents()  # instance callbacks, as dspy's LocalInterpreter(callbacks=...) takes them
    with SandboxInterpreter(CONFIG, callbacks=[local]) as interp:
        interp.execute("x = 1")
    assert local.events == ["startup", ("execute", "x = 1"), ("executed", None), "shutdown"]


# -- point 3: execute() re-entered from a host tool fails at once instead of deadlocking


def test_execute_from_inside_a_tool_raises_instead_of_deadlocking(interp):
    seen = {}

    def nested():
        try:
            interp.execute("print('inner')")
        except CodeInterpreterError as exc:
            seen["error"] = str(exc)
            return "refused"
        return "ran"

    interp.tools["nested"] = nested
    # Started here, not in the worker: bubblewrap's --die-with-parent fires when the thread that started it ends.
    interp.start()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("out", interp.execute("print(nested())")),
                              daemon=True)
    worker.start()
    worker.join(120)  # a deadlock would hang here for good; the cell limit never fires during a host call
    assert not worker.is_alive(), "execute() re-entered from a tool deadlocked"
    assert outcome["out"] == "refused"
    assert "already running code" in seen["error"]
    assert interp.execute("print('after')") == "after"  # the interpreter still works


# -- point 4: inputs that are not JSON cross converted, as dspy's serializer converts them


class Point(pydantic.BaseModel):
    x: int
    label: str
    when: datetime.date


class Colour(enum.Enum):
    RED = "red"


def test_non_json_inputs_reach_the_sandbox_converted(interp):
    inputs = {"point": Point(x=1, label="a", when=datetime.date(2024, 5, 6)), "tags": {"b", "c", "a"},
              "pair": (1, 2), "nested": {"k": ({3, 1}, (Point(x=2, label="b", when=datetime.date(2024, 1, 1)),)),
                                         "mixed": {1, "x"}}, "colour": Colour.RED}
    out = interp.execute("import json; print(json.dumps({'point': point, 'tags': tags, 'pair': pair, "
                         "'nested': nested, 'colour': colour}))", inputs)
    got = json.loads(out)
    assert got["point"] == {"x": 1, "label": "a", "when": "2024-05-06"}
    assert got["tags"] == ["a", "b", "c"]
    assert got["pair"] == [1, 2]
    assert got["nested"]["k"] == [[1, 3], [{"x": 2, "label": "b", "when": "2024-01-01"}]]
    assert sorted(got["nested"]["mixed"], key=str) == [1, "x"]  # unorderable: kept as a list
    assert got["colour"] == "red"


def test_rlm_with_pydantic_set_and_tuple_inputs_runs():
    rlm, lm = scripted_rlm("parity-inputs", [
        "print(point['x'], sorted(tags), pair)",
        "SUBMIT(answer=f\"{point['label']}:{','.join(tags)}:{sum(pair)}\")",
    ], "point: dict, tags: set[str], pair: tuple[int, int] -> answer: str")
    with dspy.context(lm=lm):
        pred = rlm(point=Point(x=5, label="p", when=datetime.date(2024, 1, 2)), tags={"z", "y"}, pair=(2, 3))
    assert pred.answer == "p:y,z:5"
    assert pred.trajectory[0]["output"].strip() == "5 ['y', 'z'] [2, 3]"


def test_an_input_that_cannot_cross_is_a_recoverable_error_told_once(interp):
    lock = threading.Lock()
    with pytest.raises(CodeExecutionError, match=r"input 'handle' is a lock .*no JSON form") as caught:
        interp.execute("print(n)", {"n": 1, "handle": lock})
    assert "not sent into the sandbox" in str(caught.value)
    # The next cell runs, with what could cross, and the refused input is not offered again.
    assert interp.execute("print(n, 'handle' in globals())", {"n": 1, "handle": lock}) == "1 False"
    with pytest.raises(CodeExecutionError, match=r"key of type tuple"):
        interp.execute("print(1)", {"grid": {(0, 1): "x"}})


class WithHandle(dspy.Signature):
    n: int = dspy.InputField()
    handle: object = dspy.InputField()
    answer: int = dspy.OutputField()


def test_rlm_goes_on_without_an_input_that_cannot_cross():
    rlm, lm = scripted_rlm("parity-refused", ["print(n)", "print(n + 1)", "SUBMIT(answer=n * 2)"], WithHandle)
    with dspy.context(lm=lm):
        pred = rlm(n=4, handle=threading.Lock())  # dspy's own PythonInterpreter ends the run here
    assert pred.answer == 8
    outputs = [step["output"] for step in pred.trajectory]
    assert outputs[0].startswith("[Error] input 'handle' is a lock")
    assert outputs[1].strip() == "5"


# -- point 6: names are validated up front


@pytest.mark.parametrize("name", ["class", "1x", "a-b", "SUBMIT"])
def test_bad_tool_names_fail_up_front(interp, name):
    with pytest.raises(ValueError, match=r"tool names must be Python identifiers.*" + repr(name)):
        SandboxInterpreter(CONFIG, tools={name: len})  # ValueError, as dspy's LocalInterpreter raises here
    interp.tools[name] = len
    with pytest.raises(CodeInterpreterError, match=r"tool names must be Python identifiers"):
        interp.execute("print(1)")
    assert interp.session is None  # refused before a sandbox was started


@pytest.mark.parametrize("name", ["class", "1x", "a-b"])
def test_bad_variable_and_output_field_names_fail_up_front(interp, name):
    with pytest.raises(CodeInterpreterError, match=r"variable names must be Python identifiers.*" + repr(name)):
        interp.execute("print(1)", {name: 1})
    interp.output_fields = [{"name": name, "type": "str"}]
    with pytest.raises(CodeInterpreterError, match=r"output field names must be Python identifiers"):
        interp.execute("print(1)")


def test_output_field_without_a_name_is_a_clear_error(interp):
    interp.output_fields = [{"name": "answer", "type": "str"}, {"type": "int"}]
    with pytest.raises(CodeInterpreterError, match=r"every output field needs a 'name'.*'type': 'int'"):
        interp.execute("print(1)")
    interp.output_fields = [{"name": "answer"}, {"name": "answer"}]
    with pytest.raises(CodeInterpreterError, match="unique"):
        interp.execute("print(1)")
    interp.output_fields = [{"name": "answer", "type": "str"}]
    assert interp.execute("SUBMIT(answer='ok')") == FinalOutput({"answer": "ok"})


def test_a_variable_named_like_a_tool_is_refused(interp):
    interp.tools["lookup"] = len
    with pytest.raises(CodeInterpreterError, match=r"or the name of a tool; invalid: \['lookup'\]"):
        interp.execute("print(1)", {"lookup": 1})


# -- point 9: tool results that are models, dataclasses or namedtuples cross converted


Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Box:
    size: int
    pair: Pair
    tags: frozenset


def test_tool_results_cross_converted(interp):
    interp.tools.update({
        "model": lambda: Point(x=3, label="m", when=datetime.date(2020, 2, 29)),
        "box": lambda: Box(size=2, pair=Pair(1, 2), tags=frozenset({"y", "x"})),
        "pair": lambda: Pair("l", "r"),
        "many": lambda: [Pair(1, 2), (3, 4), {5}],
    })
    code = "import json; print(json.dumps([model(), box(), pair(), many()]))"
    assert json.loads(interp.execute(code)) == [
        {"x": 3, "label": "m", "when": "2020-02-29"},
        {"size": 2, "pair": {"left": 1, "right": 2}, "tags": ["x", "y"]},
        {"left": "l", "right": "r"},
        [{"left": 1, "right": 2}, [3, 4], [5]],
    ]


def test_a_tool_result_that_cannot_cross_is_a_tool_error_saying_why(interp):
    interp.tools["opener"] = lambda: threading.Lock()
    with pytest.raises(CodeExecutionError, match=r"opener\(\) failed on the host: .*result of opener\(\) is a lock"):
        interp.execute("opener()")
