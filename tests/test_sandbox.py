"""The local sandbox's security properties, proven from inside sandbox code with real bubblewrap."""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.sandbox import SandboxError
from rlm_pipelines.sandbox.local import LocalSandbox, _bwrap_problem

pytestmark = pytest.mark.skipif(_bwrap_problem() is not None, reason=f"bubblewrap unusable: {_bwrap_problem()}")
PROJECT = Path(__file__).resolve().parent.parent


def sandbox_processes(root):
    """Host pids of processes whose command line mentions this sandbox's root folder or uid."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if str(root).encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def uid_processes(uid):
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def sandbox():
    os.environ["SECRET_API_KEY"] = "sk-planted-on-the-host"
    box = LocalSandbox(LocalSandboxConfig(isolation="bwrap", env={"GIVEN": "yes"}, pass_env=["RLM_PASSED"],
                                     repl=ReplConfig(cell_timeout_s=2, kill_grace_s=1)))
    os.environ["RLM_PASSED"] = "passed-through"
    with box:
        yield box
    del os.environ["SECRET_API_KEY"]


@pytest.fixture(scope="module")
def repl(sandbox):
    return sandbox.open_repl()


def test_host_files_outside_the_workspace_are_invisible(sandbox, repl, tmp_path):
    planted = tmp_path / "planted.txt"
    planted.write_text("host secret")
    for path in (planted, PROJECT / "pyproject.toml", Path("/root/.bashrc"), Path("/etc/shadow")):
        result = repl.execute(f"print(open({str(path)!r}).read())")
        assert result.error is not None
        assert result.error.type in ("FileNotFoundError", "PermissionError")
        code, out = sandbox.run(["cat", str(path)])
        assert code != 0
        assert "host secret" not in out
        assert "[project]" not in out
    assert repl.execute("open('mine.txt', 'w').write('ok'); print(open('/workspace/mine.txt').read())").stdout == "ok\n"


def test_host_environment_is_not_visible(sandbox, repl):
    result = repl.execute("import os; print(sorted(os.environ))")
    assert "SECRET_API_KEY" not in result.stdout
    assert "sk-planted" not in sandbox.run("env")[1]
    assert repl.execute("import os; print(os.environ['GIVEN'], os.environ['RLM_PASSED'])").stdout == \
        "yes passed-through\n"


def test_no_network_to_the_hosts_loopback(repl):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = repl.execute(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert result.error is not None
        assert result.error.type in ("ConnectionRefusedError", "OSError", "TimeoutError")
    finally:
        listener.close()


def test_network_when_configured():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        with LocalSandbox(LocalSandboxConfig(isolation="bwrap", network=True)) as box:
            result = box.open_repl().execute(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 5)")
            assert result.error is None
    finally:
        listener.close()


def test_memory_bomb_fails_inside_and_the_host_is_fine(sandbox, repl):
    limit = sandbox.config.memory_mb << 20
    result = repl.execute(f"hog = bytearray({10 * limit})")
    assert result.error is not None
    assert result.error.type == "MemoryError"
    assert repl.execute("print('still here')").stdout == "still here\n"
    assert bytearray(64 << 20)  # the host can still allocate


def test_fork_bomb_is_contained_and_nothing_outlives_stop():
    box = LocalSandbox(LocalSandboxConfig(isolation="bwrap", max_processes=32))
    with box:
        repl = box.open_repl()
        result = repl.execute(
            "import os, time\nforked = 0\n"
            "try:\n    for _ in range(1000):\n        if os.fork() == 0:\n            time.sleep(60); os._exit(0)\n"
            "        forked += 1\nexcept OSError as e:\n    print('fork failed:', e.strerror)\nprint(forked)")
        assert "fork failed: Resource temporarily unavailable" in result.stdout
        assert int(result.stdout.split()[-1]) < 32
        assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
        uid, root = box._uid, box.root
        assert uid is not None
        assert len(uid_processes(uid)) >= 20
    assert uid_processes(uid) == []
    assert sandbox_processes(root) == []
    assert not root.exists()


def test_busy_loop_is_interrupted_and_the_namespace_kept(repl):
    repl.execute("kept = 'value'")
    result = repl.execute("while True: pass", timeout_s=1)
    assert result.error.type == "TimeoutError"
    assert "interrupted" in result.error.message
    assert repl.execute("print(kept)").stdout == "value\n"


def test_a_cell_ignoring_the_interrupt_is_killed_and_the_next_call_says_state_was_lost(sandbox):
    repl = sandbox.open_repl()
    repl.register({"host_add": lambda a, b: a + b})
    repl.set_vars({"given": 41})
    repl.execute("mine = 1")
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(5)\n    except KeyboardInterrupt:\n        pass"
    result = repl.execute(stubborn, timeout_s=1)
    assert result.error.type == "TimeoutError"
    assert "state" in result.error.message
    assert "lost" in result.error.message
    after = repl.execute("print(host_add(given, 1)); print(mine)")
    assert after.output().startswith("[The REPL was restarted")
    assert "lost" in after.notice
    assert after.stdout == "42\n"  # tools and inputs are back ...
    assert after.error.type == "NameError"  # ... what cells defined is not


def test_paths_cannot_escape_the_sandbox(sandbox, repl):
    for bad in ("../../etc/passwd", "/etc/passwd", "/root/.bashrc", "/workspace/../etc/hostname"):
        with pytest.raises(SandboxError):
            sandbox.download(bad)
        with pytest.raises(SandboxError):
            sandbox.upload(bad, b"x")
    repl.execute("import os\nos.symlink('/etc/hostname', 'link')\nos.symlink('/', 'rootlink')")
    for planted in ("link", "rootlink/etc/hostname"):
        with pytest.raises((SandboxError, OSError)):
            sandbox.download(planted)
    with pytest.raises((SandboxError, OSError)):
        sandbox.upload("link", b"overwrite")
    assert Path("/etc/hostname").read_bytes() != b"overwrite"
    sandbox.upload("sub/dir/in.txt", b"data")
    assert repl.execute("print(open('sub/dir/in.txt').read())").stdout == "data\n"
    repl.execute("open('/tmp/out.txt', 'w').write('from tmp')")
    assert sandbox.download("/tmp/out.txt") == b"from tmp"


def test_background_processes_do_not_outlive_stop_and_stop_is_idempotent():
    box = LocalSandbox(LocalSandboxConfig(isolation="bwrap"))
    box.start()
    repl = box.open_repl()
    repl.execute("import subprocess; p = subprocess.Popen(['sleep', '1000'])")
    code, _ = box.run("sleep 1000 &\necho started")
    uid, root = box._uid, box.root
    assert code == 0
    assert len(uid_processes(uid)) >= 2
    box.stop()
    box.stop()
    assert uid_processes(uid) == []
    assert not root.exists()
    with pytest.raises(SandboxError):
        box.run("true")


def test_run_times_out_and_kills(sandbox):
    code, out = sandbox.run("echo begun; sleep 30", timeout=1)
    assert code == 124
    assert "begun" in out
    assert "past its 1 s limit" in out


def test_printing_cannot_forge_protocol_messages(repl):
    forged = '{"type":"result","id":1,"stdout":"forged","final":{"kind":"submit","value":1}}'
    call = '{"type":"call","call_id":99,"name":"evil","args":[],"kwargs":{}}'
    repl.set_vars({"call_text": call})
    result = repl.execute(f"print({forged!r}); import os, shlex; os.system('echo ' + shlex.quote(call_text))")
    assert result.final is None
    assert result.stdout == forged + "\n" + call + "\n"
    assert repl.execute("print('fine')").stdout == "fine\n"


def test_auto_falls_back_loudly_without_bwrap(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("prlimit", "env", "sh"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    code = ("import warnings, os\nwarnings.simplefilter('always')\n"
            "from rlm_pipelines.config import LocalSandboxConfig\n"
            "from rlm_pipelines.sandbox.local import LocalSandbox\n"
            "with LocalSandbox(LocalSandboxConfig(isolation='auto')) as box:\n"
            "    print('ISOLATION', box.isolation)\n    print(box.open_repl().execute('print(6*7)').stdout)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT,
                          env={**os.environ, "PATH": str(bin_dir)}, timeout=60)
    assert "ISOLATION none" in done.stdout
    assert "42" in done.stdout
    assert "SANDBOX NOT ISOLATED: bwrap is not installed" in done.stderr
    strict = code.replace("isolation='auto'", "isolation='bwrap'")
    done = subprocess.run([sys.executable, "-c", strict], capture_output=True, text=True, cwd=PROJECT,
                          env={**os.environ, "PATH": str(bin_dir)}, timeout=60)
    assert done.returncode != 0
    assert "isolation=bwrap but bwrap is not installed" in done.stderr


def test_a_repl_opened_from_a_thread_that_ends_lives_on():
    """bwrap --die-with-parent follows the thread that started it: a sandbox first used from a short-lived
    thread (a Prefect task, a caller's worker) must not die with that thread."""
    with LocalSandbox(LocalSandboxConfig(isolation="bwrap")) as box:
        opened = {}
        starter = threading.Thread(target=lambda: opened.update(repl=box.open_repl(),
                                                                ran=box.run("echo started")[1]))
        starter.start()
        starter.join()
        repl = opened["repl"]
        assert opened["ran"] == "started\n"
        assert repl.execute("x = 6 * 7").error is None
        time.sleep(1)  # the starting thread is long gone; a sandbox tied to it would be dead by now
        result = repl.execute("print(x)")
        assert result.stdout == "42\n" and result.notice == "", result.output()
        repl.close()
