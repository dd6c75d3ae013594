"""The dspy CodeInterpreter adapter over a real bubblewrap sandbox, driven the way dspy.RLM drives it."""

import threading

import pytest
from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreter, CodeInterpreterError, FinalOutput

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory

FIELDS = [{"name": "answer", "type": "str"}, {"name": "count", "type": "int"}]


@pytest.fixture
def interp():
    interpreter = SandboxInterpreterFactory(LocalSandboxConfig(isolation="bwrap", repl=ReplConfig(cell_timeout_s=5)))()
    interpreter.output_fields = FIELDS
    yield interpreter
    interpreter.shutdown()


def test_satisfies_dspy_protocol_and_factory_contract(interp):
    assert isinstance(interp, CodeInterpreter)
    factory = SandboxInterpreterFactory()
    assert not isinstance(factory, CodeInterpreter)  # dspy refuses factories that look like interpreters
    text = factory.execution_instructions
    assert "bubblewrap" in text
    assert "no network" in text
    assert "SUBMIT" in text


def test_state_kept_and_typed_submit(interp):
    assert interp.execute("x = 20\nprint('set')") == "set"
    assert interp.execute("x + 1") == 21  # a trailing expression comes back as its value, as in dspy
    out = interp.execute("SUBMIT(answer='done', count=x)")
    assert out == FinalOutput({"answer": "done", "count": 20})


def test_rejected_submit_and_second_run_keep_working(interp):
    interp.execute("total = 5")
    with pytest.raises(CodeExecutionError, match="SUBMIT fields must be exactly"):
        interp.execute("SUBMIT(answer='x')")
    with pytest.raises(CodeExecutionError, match="JSON-compatible"):
        interp.execute("SUBMIT(answer={1, 2}, count=1)")
    assert interp.execute("SUBMIT('ok', total)") == FinalOutput({"answer": "ok", "count": 5})
    # dspy.RLM re-injects fresh tools and fields for the next run on this interpreter
    interp.tools.update({"double": lambda n: 2 * n})
    interp.output_fields = [{"name": "result", "type": "int"}]
    interp._tools_registered = False
    assert interp.execute("SUBMIT(result=double(total))") == FinalOutput({"result": 10})


def test_model_mistakes_are_recoverable_errors(interp):
    with pytest.raises(SyntaxError):
        interp.execute("def broken(:\n  pass")
    with pytest.raises(CodeExecutionError) as caught:
        interp.execute("print('before'); {}['missing']")
    assert "before" in str(caught.value)
    assert "KeyError" in str(caught.value)
    interp.execute("kept = 1")
    with pytest.raises(CodeExecutionError, match="TimeoutError"):
        interp.execute("while True: pass")  # cell_timeout_s=5 in the fixture
    assert interp.execute("kept") == 1


def test_empty_code_gets_a_clear_observation(interp):
    assert "no `code`" in interp.execute("   \n")


def test_inputs_cross_once_and_resend_only_when_changed(interp):
    sent = []
    # Count what reaches the REPL by wrapping the session method the adapter calls (real REPL underneath).
    interp.start()
    real_set_vars = interp.session.set_vars
    interp.session.set_vars = lambda variables: (sent.append(sorted(variables)), real_set_vars(variables))[1]
    book = "chapter " * 150_000
    chapters = ["one", "two"]
    for _ in range(5):
        interp.execute("n = len(book) + len(chapters)", {"book": book, "chapters": chapters})
    assert sent == [["book", "chapters"]]
    chapters.append("three")  # mutated in place: must be sent again
    assert interp.execute("len(chapters)", {"book": book, "chapters": chapters}) == 3
    assert sent[-1] == ["chapters"]


def test_tools_called_concurrently_from_sandbox_threads(interp):
    barrier = threading.Barrier(6, timeout=20)

    def meet(i):
        barrier.wait()  # only passes if six calls are in flight at once
        return i * i

    interp.tools["meet"] = meet
    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(6) as pool: print(sorted(pool.map(meet, range(6))))")
    assert interp.execute(code) == "[0, 1, 4, 9, 16, 25]"


def test_host_tool_error_reaches_the_model(interp):
    def fails(path):
        raise FileNotFoundError(f"no such file: {path}")

    interp.tools["fails"] = fails
    with pytest.raises(CodeExecutionError, match="fails\\(\\) failed on the host: FileNotFoundError"):
        interp.execute("fails('a.txt')")


def test_shutdown_is_idempotent_and_final(interp):
    interp.execute("1")
    sandbox = interp.sandbox
    interp.shutdown()
    interp.shutdown()
    assert sandbox.root is None
    with pytest.raises(CodeInterpreterError, match="shut down"):
        interp.execute("1")
