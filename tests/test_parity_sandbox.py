"""dspy parity of cell execution (issue 12, points 2, 7, 8), in a real bubblewrap sandbox through the real
REPL session and `SandboxInterpreter`: a cell's trailing value comes back the way dspy's interpreters return
it, the names the REPL provides survive a cell that rebinds them, and a host call cannot stretch a cell past
its absolute ceiling or the run's deadline."""

import json
import threading
import time

import dspy
import pytest

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.engines.interpreter import SandboxInterpreter, SandboxInterpreterFactory
from rlm_pipelines.sandbox.local import LocalSandbox

FLEX_CELL = "import json as _j\nout = {'result': 42, 'why': 'it \"is\" so'}\n_j.dumps(out)"


def bwrap(**repl):
    return LocalSandboxConfig(isolation="bwrap", repl=ReplConfig(**repl))


@pytest.fixture
def interp():
    interpreter = SandboxInterpreter(bwrap(cell_timeout_s=30))
    yield interpreter
    interpreter.shutdown()


# -- point 2: the trailing value


def test_flex_style_consumer_gets_the_json_string(interp):
    """dspy.Flex runs a cell ending in json.dumps(...) and json.loads what execute returns."""
    result = interp.execute(FLEX_CELL)
    assert json.loads(result) == {"result": 42, "why": 'it "is" so'}


def test_dspy_flex_runs_on_our_interpreter():
    """The real dspy.Flex: its bridge runs the bound module in our sandbox and json.loads the cell's value;
    the module prints on the way, which must not spoil the value."""

    class Signature(dspy.Signature):
        value: int = dspy.InputField()
        result: int = dspy.OutputField()
        note: str = dspy.OutputField()

    module = ("class Plus(dspy.Module):\n"
              "    def forward(self, **inputs):\n"
              "        print('working on it')\n"
              "        return dspy.Prediction(result=inputs['value'] + 22, note='said \"so\"')\n")
    program = dspy.Flex(Signature, interpreter_factory=SandboxInterpreterFactory(bwrap()))
    program._bind_code(module)
    prediction = program(value=20)
    assert (prediction.result, prediction.note) == (42, 'said "so"')


def test_trailing_values_come_back_as_values(interp):
    assert interp.execute("6 * 7") == 42
    assert interp.execute("[1, 2.5, None, True]") == [1, 2.5, None, True]
    assert interp.execute("{'a': {'b': [1]}}") == {"a": {"b": [1]}}
    assert interp.execute("'plain text'") == "plain text"  # a str is the string itself, not its repr
    not_json = interp.execute("class Thing:\n    def __repr__(self): return 'Thing(7)'\nThing()")
    assert not_json == "Thing(7)"  # not JSON: its repr, as dspy's interpreters give it
    assert interp.execute("{1, 2}") == "{1, 2}"


def test_printed_output_is_unchanged(interp):
    assert interp.execute("print('hello')\nx = 1") == "hello"
    assert interp.execute("print('a'); print('b')") == "a\nb"
    assert interp.execute("y = 3") is None


def test_what_the_model_sees_in_cell_output():
    """The session's CellResult: the value's text after the printed output (a str as itself, other values
    as their repr), and the value as data for callers that consume it."""
    with LocalSandbox(bwrap()) as box, box.open_repl() as repl:
        both = repl.execute("print('seen')\n'the value'")
        assert both.output() == "seen\nthe value"
        assert both.data == "the value"
        dumped = repl.execute(FLEX_CELL)
        assert dumped.value == dumped.data == '{"result": 42, "why": "it \\"is\\" so"}'
        pair = repl.execute("(1, 'two')")
        assert pair.value == "(1, 'two')" and pair.data == [1, "two"]


# -- point 7: the scaffold names


def test_scaffold_names_restored_after_every_cell():
    calls = []

    def lookup(key):
        calls.append(key)
        return {"k": "v"}[key]

    interpreter = SandboxInterpreter(bwrap(), tools={"lookup": lookup, "llm_query": lambda prompt: "sub:" + prompt},
                                     output_fields=[{"name": "answer"}])
    try:
        out = interpreter.execute("SUBMIT = None\nllm_query = 5\nlookup = lambda key: 'forged'\nprint('rebound')")
        assert "rebound" in out and "put back after this cell" in out
        assert interpreter.execute("lookup('k')") == "v"  # the host's tool, not the cell's lambda
        assert calls == ["k"]
        assert interpreter.execute("llm_query('x')") == "sub:x"
        assert "SUBMIT" in interpreter.execute("del SUBMIT\nprint('deleted')")
        final = interpreter.execute("SUBMIT(answer=lookup('k'))")
        assert final.output == {"answer": "v"}
    finally:
        interpreter.shutdown()


# -- point 8: the absolute cell ceiling and the run's deadline


def blocking_tool():
    """A host tool that blocks until released (or 60 s): whether it was still blocking when the cell came
    back tells whether the host call extended the cell."""
    released, finished = threading.Event(), threading.Event()

    def wait_on_host():
        released.wait(60)
        finished.set()
        return "late"

    return wait_on_host, released, finished


def test_a_blocking_host_call_cannot_extend_the_cell_past_its_ceiling():
    tool, released, finished = blocking_tool()
    with LocalSandbox(bwrap(cell_timeout_s=2, cell_ceiling_s=5, kill_grace_s=5)) as box, box.open_repl() as repl:
        repl.register({"wait_on_host": tool})
        try:
            result = repl.execute("before = 1\nwait_on_host()")
            assert not finished.is_set()  # the cell came back while the host call was still blocking
        finally:
            released.set()
        assert result.error is not None and result.error.type == "TimeoutError"
        assert "sandbox.repl.cell_ceiling_s" in result.error.message
        assert "5 s ceiling" in result.error.message
        assert repl.execute("before").data == 1  # interrupted, not killed: the namespace is kept


def test_the_run_deadline_cuts_a_cell_waiting_on_the_host():
    tool, released, finished = blocking_tool()
    interpreter = SandboxInterpreter(bwrap(cell_timeout_s=2, kill_grace_s=5), tools={"wait_on_host": tool})
    try:
        interpreter.execute("ready = 1")  # the sandbox is up: the deadline below is for the cell alone
        interpreter.deadline = time.monotonic() + 4
        with pytest.raises(BudgetExceeded) as caught:
            interpreter.execute("wait_on_host()")
        assert not finished.is_set()
        assert caught.value.status == "timeout"
    finally:
        released.set()
        interpreter.shutdown()


def test_changed_builtins_are_renewed_after_the_cell():
    with SandboxInterpreter(bwrap(), tools={"add": lambda a, b: a + b}) as interpreter:
        out = interpreter.execute("__builtins__['len'] = None\nSUBMIT = None\nadd = None\nprint(len)")
        assert out.startswith("None") and "SUBMIT, add: provided by the REPL" in out
        assert interpreter.execute("len([1])") == 1
        assert interpreter.execute("add(19, 23)") == 42
        assert interpreter.execute("SUBMIT(42)").output == {"output": 42}
        assert interpreter.execute("del __builtins__\nlen('ab')") == 2
        assert interpreter.execute("__builtins__['len'] = None\n'changed'") == "changed"
        assert interpreter.execute("len('abc')") == 3  # renewed: the server's own builtins were never touched


def test_a_trailing_value_over_the_message_limit_is_cut_not_an_error():
    with LocalSandbox(bwrap(max_message_mb=1)) as box, box.open_repl() as repl:
        text = repl.execute("'x' * 3_000_000 + 'END'")
        assert text.error is None
        assert "over the 1 MB limit of one message (sandbox.repl.max_message_mb)" in text.value
        assert text.value.startswith("xxx") and text.value.endswith("END")
        numbers = repl.execute("list(range(400_000))")  # about 3 MB as JSON: shown by its repr alone
        assert numbers.error is None and numbers.value.startswith("[0, 1, 2") and len(numbers.value) < 11_000
        assert numbers.data == numbers.value
        assert repl.execute("list(range(3))").data == [0, 1, 2]
