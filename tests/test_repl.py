"""The REPL server and host session: namespace, output capture, host calls, run-ending builtins, restarts."""

import threading

import pytest

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.sandbox.local import LocalSandbox


@pytest.fixture(scope="module", params=["bwrap", "none"])
def box(request):
    with LocalSandbox(LocalSandboxConfig(isolation=request.param, repl=ReplConfig(output_limit_chars=2000))) as sandbox:
        yield sandbox


@pytest.fixture
def repl(box):
    session = box.open_repl()
    yield session
    session.close()


def test_namespace_values_and_errors(repl):
    assert repl.execute("a = 2\nb = a * 21").ok
    assert repl.execute("b").value == "42"
    assert repl.execute("None").value is None
    err = repl.execute("x = 1\n\nundefined_name + 1").error
    assert err.type == "NameError"
    assert 'File "<cell-' in err.traceback
    assert "line 3" in err.traceback
    assert "server.py" not in err.traceback
    syntax = repl.execute("def f(:").error
    assert syntax.type == "SyntaxError"
    assert "line 1" in syntax.traceback


def test_output_captured_at_fd_level_and_in_order(repl):
    result = repl.execute("import os, sys, subprocess\nprint('one')\nos.system('echo two')\nprint('three')\n"
                          "print('err', file=sys.stderr)\nsubprocess.run(['sh', '-c', 'echo child-err >&2'])")
    assert result.stdout == "one\ntwo\nthree\n"
    assert result.stderr == "err\nchild-err\n"


def test_output_cap_keeps_head_and_tail(repl):
    result = repl.execute("print('HEAD'); print('x' * 50000); print('TAIL')")
    assert result.stdout.startswith("HEAD")
    assert result.stdout.rstrip().endswith("TAIL")
    assert "bytes of output cut: head and tail kept" in result.stdout
    assert len(result.stdout) < 2200
    assert repl.execute("print('small')").stdout == "small\n"  # the cap resets per cell


def test_concurrent_host_calls_from_sandbox_threads(repl):
    barrier = threading.Barrier(8, timeout=20)

    def square(n):
        barrier.wait()  # succeeds only if all eight calls are waiting on the host together
        return n * n

    repl.register({"square": square})
    result = repl.execute("from concurrent.futures import ThreadPoolExecutor\n"
                          "with ThreadPoolExecutor(8) as pool: print(list(pool.map(square, range(8))))")
    assert result.stdout == "[0, 1, 4, 9, 16, 25, 36, 49]\n"


def test_host_function_errors_are_clear(repl):
    def explode(reason="boom"):
        """Always fails."""
        raise ValueError(reason)

    repl.register({"explode": explode})
    err = repl.execute("explode('bad input')").error
    assert err.type == "ToolError"
    assert "explode() failed on the host: ValueError: bad input" in err.message
    assert repl.execute("explode(object())").error.type == "TypeError"  # not JSON: refused in the sandbox
    assert repl.execute("explode(1, 2, 3)").error.type == "TypeError"  # the stub has the real signature
    assert repl.execute("print(explode.__doc__)").stdout == "Always fails.\n"


def test_inputs_injected_once_persist(repl):
    big = "y" * (1 << 20)
    repl.set_vars({"big": big, "items": [1, 2, 3]})
    for _ in range(10):
        assert repl.execute("len(big) + sum(items)").value == str((1 << 20) + 6)


def test_submit_final_and_final_var(repl):
    repl.register({}, submit_fields=["answer", "score"], final=True)
    assert repl.execute("SUBMIT('yes', 3)").final == {"kind": "submit", "value": {"answer": "yes", "score": 3}}
    assert repl.execute("SUBMIT(score=1, answer='k')").final["value"] == {"answer": "k", "score": 1}
    rejected = repl.execute("keep = 5\nSUBMIT(answer='only')")
    assert rejected.final is None
    assert "missing ['score']" in rejected.error.message
    assert repl.execute("keep").value == "5"
    assert repl.execute("try:\n    FINAL('x')\nexcept Exception:\n    pass").final == {"kind": "final", "value": "x"}
    assert repl.execute("report = {'files': 3}\nFINAL_VAR('report')").final["value"] == {"files": 3}
    missing = repl.execute("FINAL_VAR('nope')")
    assert missing.final is None
    assert "no variable named 'nope'" in missing.error.message


def test_input_exit_and_a_dead_server(repl):
    assert repl.execute("input()").error.type == "EOFError"
    assert repl.execute("import sys; sys.exit(3)").error.type == "SystemExit"
    repl.set_vars({"given": "kept"})
    repl.execute("local = 1")
    died = repl.execute("import os; os._exit(1)")
    assert died.error.type == "ReplDied"
    assert "lost" in died.error.message
    after = repl.execute("print(given)")
    assert after.notice.startswith("[The REPL was restarted")
    assert after.stdout == "kept\n"
    assert repl.execute("local").error.type == "NameError"


def test_close_is_idempotent_and_ends_the_server(box):
    session = box.open_repl()
    process = session._conn.transport.process
    session.execute("1")
    session.close()
    session.close()
    assert process.poll() is not None
    assert not session.alive
