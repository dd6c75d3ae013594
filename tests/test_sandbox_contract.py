"""One contract, every backend: what the engines rely on from a sandbox, run against the local sandbox
(bubblewrap) and against DaytonaSandbox talking to the local fake Daytona API through the real SDK."""

import threading
import time

import pytest

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.sandbox import SandboxError, make_sandbox
from tests.conftest import FAKE_KEY_ENV, daytona_config

REPL = ReplConfig(cell_timeout_s=3, kill_grace_s=1, start_timeout_s=60)


@pytest.fixture(scope="module", params=["local", "daytona"])
def config(request):
    if request.param == "local":
        return LocalSandboxConfig(isolation="bwrap", repl=REPL)
    return daytona_config(request.getfixturevalue("fake_daytona"), repl=REPL)


@pytest.fixture(scope="module")
def box(config):
    with make_sandbox(config, name="contract") as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def repl(box):
    session = box.open_repl()
    yield session
    session.close()


def test_run_returns_exit_code_and_output(box):
    assert box.run("echo out; echo err >&2; exit 3") == (3, "out\nerr\n")
    box.run("mkdir -p sub && echo x > sub/f")
    code, out = box.run(["cat", "f"], cwd="sub")
    assert (code, out) == (0, "x\n")
    assert box.run("pwd")[1].strip() == box.workdir


def test_run_timeout_kills_the_command(box):
    started = time.monotonic()
    code, _ = box.run("sleep 30", timeout=2)
    assert code == 124
    assert time.monotonic() - started < 20


def test_upload_download_round_trip(box):
    data = bytes(range(256)) * 1000
    box.upload("deep/er/blob.bin", data)
    assert box.download("deep/er/blob.bin") == data
    assert box.run("wc -c < deep/er/blob.bin")[1].strip() == str(len(data))
    assert box.download(f"{box.workdir}/deep/er/blob.bin") == data  # absolute paths too
    with pytest.raises(OSError):
        box.download("no/such/file")


def test_sandbox_code_does_not_see_the_host_environment(box, monkeypatch):
    monkeypatch.setenv("RLM_SECRET_PROBE", "leak")
    code, out = box.run("env")
    assert code == 0
    assert "RLM_SECRET_PROBE" not in out
    assert FAKE_KEY_ENV not in out


def test_repl_state_persists_across_cells(repl):
    assert repl.execute("import math\nvalues = [math.sqrt(16)]").ok
    result = repl.execute("values.append(5)\nvalues")
    assert result.ok
    assert result.value == "[4.0, 5]"
    error = repl.execute("1/0")
    assert error.error.type == "ZeroDivisionError"
    assert "1/0" in error.error.traceback
    assert repl.execute("print(len(values))").stdout == "2\n"


def test_host_calls_round_trip_concurrently(repl):
    seen, lock = [], threading.Lock()

    def shout(text):
        with lock:
            seen.append(text)
        time.sleep(0.2)
        return text.upper()

    repl.register({"shout": shout}, submit_fields=["answer"])
    result = repl.execute(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    loud = list(pool.map(shout, ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']))\n"
        "print(''.join(loud))")
    assert result.ok, result.output()
    assert result.stdout == "ABCDEFGH\n"
    assert sorted(seen) == list("abcdefgh")
    assert result.duration_s < 1.5  # eight 0.2 s calls answered in parallel, not one after another


def test_submit_ends_the_cell_and_returns_the_values(repl):
    repl.register({}, submit_fields=["answer", "n"])
    result = repl.execute("x = 7\nSUBMIT(answer='done', n=x)\nprint('not reached')")
    assert result.final == {"kind": "submit", "value": {"answer": "done", "n": 7}}
    assert result.stdout == ""
    assert repl.execute("x").value == "7"


def test_large_inputs_arrive_once_and_survive_a_restart(repl):
    book = "chapter " * 40_000  # 320 KB: sent as a file, not in a message
    repl.set_vars({"book": book, "small": 1})
    assert repl.execute("len(book), small").value == f"({len(book)}, 1)"
    died = repl.execute("import os\nos._exit(1)")
    assert died.error.type == "ReplDied"
    again = repl.execute("len(book), small")
    assert again.value == f"({len(book)}, 1)"
    assert "restarted" in again.notice


def test_cell_timeout_interrupts_and_keeps_state(repl):
    repl.execute("kept = 'yes'")
    result = repl.execute("import time\nwhile True: time.sleep(0.05)")
    assert result.error.type == "TimeoutError"
    assert "interrupted" in result.error.message
    assert repl.execute("kept").value == "yes"  # a str value is shown as itself


def test_stop_is_idempotent_and_final(config):
    sandbox = make_sandbox(config, name="contract-stop")
    sandbox.start()
    session = sandbox.open_repl()
    assert session.execute("1 + 1").value == "2"
    sandbox.stop()
    sandbox.stop()
    assert not session.alive
    with pytest.raises(SandboxError):
        sandbox.run("true")
    with pytest.raises(SandboxError):
        sandbox.start()
