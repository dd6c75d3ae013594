"""Issue 12, speed: what the REPL's start-up no longer does, checked for real (the figures themselves come
from benchmarks/interpreters.py; no test here is timed).

- The sandbox runs server.py compiled on the host (Python never caches the compile of a script it runs),
  from a copy bound read-only: sandbox code can neither change it nor the next server start.
- The server imports at start only what the first result needs: argparse, inspect, hmac and secrets are
  not loaded until a bad command line, a tool's signature or the HTTP transport needs them.
- Its hand-read command line still explains a wrong one the way argparse did.
"""

import subprocess
import sys

import pytest

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.repl.server import SERVER_FILE
from rlm_pipelines.sandbox.local import LocalSandbox

LAZY = ("argparse", "inspect", "hmac", "secrets", "ast")


@pytest.fixture(scope="module", params=["bwrap", "none"])
def box(request):
    with LocalSandbox(LocalSandboxConfig(isolation=request.param)) as sandbox:
        yield sandbox


def test_the_repl_runs_a_compiled_server_that_sandbox_code_cannot_change(box):
    repl = box.open_repl()
    try:
        found = repl.execute(  # the worker is forked from the server process: the same command line
            "words = open('/proc/self/cmdline', 'rb').read().decode().split('\\0')\n"
            "print(words[1:3])\n"
            f"try:\n"
            f"    assert {box.isolation == 'bwrap'}, 'not isolated: nothing to try'\n"
            "    open(words[2], 'ab').write(b'raise SystemExit')\n"
            "    print('WROTE')\n"
            "except (OSError, AssertionError) as exc:\n"
            "    print('refused', type(exc).__name__)\n")
        assert found.error is None, found.error
        flag, server = eval(found.stdout.splitlines()[0])
        assert flag == "-I" and server.endswith("server.pyc"), found.stdout
        assert "WROTE" not in found.stdout and "refused" in found.stdout
        if box.isolation == "bwrap":  # (not isolated, sandbox code can change anything of the user's anyway)
            assert "refused OSError" in found.stdout or "refused PermissionError" in found.stdout
        # A traceback through the compiled server names the cell, never the server's own frames.
        error = repl.execute("def f():\n    raise ValueError('boom')\nf()").error
        assert error.type == "ValueError" and "<cell-" in error.traceback and "server.py" not in error.traceback
        assert repl.execute("print(6*7)").stdout == "42\n"
    finally:
        repl.close()


def test_the_server_starts_without_what_only_errors_tools_or_http_need(box):
    repl = box.open_repl()
    try:
        loaded = repl.execute(f"import sys\nprint([m for m in {LAZY!r} if m in sys.modules])")
        assert loaded.stdout == "[]\n", loaded.stdout
        # and what was left out still works when it is needed: a tool's signature needs inspect
        repl.register({"add": lambda a, b=2: a + b})
        assert repl.execute("print(add(40))").stdout == "42\n"
        wrong = repl.execute("add(1, 2, 3)")
        assert wrong.error.type == "TypeError" and "add(a, b=2)" in wrong.error.message
    finally:
        repl.close()


@pytest.mark.parametrize("args, code, says", [
    (["--fds", "3"], 2, "argument --fds: expected 2 arguments"),
    (["--http", "8080"], 2, "--http needs --secret-file"),
    (["--fds", "3", "4", "--output-limit", "many"], 2, "--output-limit: invalid int value: 'many'"),
    (["--fds", "3", "4", "--bogus"], 2, "unrecognized arguments: --bogus"),
    ([], 2, "one of the arguments --fds --http is required"),
    (["--help"], 0, "--max-frame-mb"),
])
def test_a_wrong_server_command_line_is_explained(args, code, says):
    done = subprocess.run([sys.executable, "-I", SERVER_FILE, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done
    assert says in done.stdout + done.stderr


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_the_repl_runs_under_the_sandbox_limits_it_sets_itself(isolation):
    """The server sets the per-process limits before any cell (one process fewer to start than prlimit)."""
    config = LocalSandboxConfig(isolation=isolation, memory_mb=700, cpu_seconds=123, file_size_mb=5, max_processes=40)
    with LocalSandbox(config) as box:
        repl = box.open_repl()
        shown = repl.execute("import resource\nprint([resource.getrlimit(getattr(resource, 'RLIMIT_' + n)) "
                             "for n in ('AS', 'CPU', 'FSIZE', 'CORE', 'NPROC')])").stdout
        limits = eval(shown)
        assert limits[:4] == [(700 << 20,) * 2, (123, 123), (5 << 20,) * 2, (0, 0)], shown
        assert limits[4][0] == limits[4][1] >= 40
        code, out = box.run("cat /proc/self/limits")  # commands keep prlimit, with the same figures
        assert code == 0 and "Max address space" in out and str(700 << 20) in out, out
