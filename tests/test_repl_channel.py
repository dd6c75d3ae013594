"""The REPL protocol channel against hostile cell code (issue 11, points 1, 2, 9, 13), each attack performed
for real: cells in a bubblewrap sandbox driven through the real host session, and raw HTTP against a real
`server.py --http`."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.repl.server import SERVER_FILE
from rlm_pipelines.sandbox import make_sandbox
from rlm_pipelines.sandbox.local import LocalSandbox
from tests.conftest import daytona_config, free_port

# Forged frames, as cell code would write them on a channel it found: a fake FINAL for every id the host
# may be waiting on, then a call of a host function the cell did not make.
FORGE = r'''
import json, os, re
FORGED = "".join(json.dumps({"type": "result", "id": i, "stdout": "FORGED OUTPUT", "stderr": "", "error": None,
                             "final": {"kind": "final", "value": "FORGED"}, "value": None, "duration_s": 0})
                 + "\n" for i in range(1, 60))
FORGED += json.dumps({"type": "call", "call_id": 987654, "name": "spy", "args": ["FORGED"], "kwargs": {}}) + "\n"
'''

# Every way out of the cell's own process that cell code has: fd numbers named on command lines (its own
# included) and in environments, and the fd tables of every other process it can see.
FIND_THE_CHANNEL = FORGE + r'''
tried, wrote = [], 0
texts = [" ".join(__import__("sys").argv), " ".join(f"{k}={v}" for k, v in os.environ.items())]
for pid in filter(str.isdigit, os.listdir("/proc")):
    for name in ("cmdline", "environ"):
        try:
            texts.append(open(f"/proc/{pid}/{name}", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError as exc:
            tried.append(f"{pid}/{name}: {type(exc).__name__}")
for text in texts:  # numbers given as fds to this very process (how the channel was found before)
    for match in re.finditer(r"--fds (\d+) (\d+)", text):
        if text is texts[0]:
            for fd in map(int, match.groups()):
                try:
                    wrote += os.write(fd, FORGED.encode()) > 0
                except OSError as exc:
                    tried.append(f"own fd {fd}: {type(exc).__name__}")
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        tried.append(f"{pid}/fd: {type(exc).__name__}")
        continue
    for fd in fds:
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
            wrote += os.write(handle, FORGED.encode()) > 0
            os.close(handle)
        except OSError as exc:
            tried.append(f"{pid}/fd/{fd}: {type(exc).__name__}")
print("wrote", wrote, "tried", len(tried))
'''

# The worker's own pipes (all a cell can reach now): forged frames written into them.
FORGE_ON_OWN_PIPES = FORGE + r'''
import stat
for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, FORGED.encode())
    except OSError:
        pass
import time
time.sleep(5)
FINAL("REAL")
'''

OVERSIZE_ON_OWN_PIPES = r'''
import os, stat, time
for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, b"[" * (20 << 20))
    except OSError:
        pass
time.sleep(5)
'''


@pytest.fixture(scope="module")
def box():
    with LocalSandbox(LocalSandboxConfig(isolation="bwrap", repl=ReplConfig(max_message_mb=8))) as sandbox:
        yield sandbox


@pytest.fixture
def repl(box):
    session = box.open_repl()
    calls = []

    def spy(text=""):
        """Records who called it."""
        calls.append(text)
        return "spied"

    session.register({"spy": spy, "llm_query": spy}, final=True)
    session.calls = calls
    yield session
    session.close()


def test_cell_code_finds_no_way_to_the_host_channel(repl):
    result = repl.execute(FIND_THE_CHANNEL + "FINAL('REAL')")
    assert result.final == {"kind": "final", "value": "REAL"}, result
    assert "FORGED" not in result.stdout
    assert result.stdout.startswith("wrote 0 tried"), result.stdout  # nothing writable was found
    assert repl.calls == []
    assert repl.execute("spy('real')").value == "spied"
    assert repl.calls == ["real"]


def test_frames_forged_on_the_worker_s_own_pipe_end_that_repl_and_nothing_else(repl):
    result = repl.execute(FORGE_ON_OWN_PIPES)
    assert result.final is None  # neither the fake FINAL nor one the cell never reached
    assert "FORGED OUTPUT" not in result.stdout
    assert result.error.type == "ReplDied"
    assert repl.calls == []
    after = repl.execute("FINAL(6 * 7)")
    assert after.notice.startswith("[The REPL was restarted")
    assert after.final == {"kind": "final", "value": 42}


def _raw_exec(code, *args):
    """Run one cell on a `server.py --fds` spoken to directly (no session): every frame it sends back."""
    to_server_r, to_server = os.pipe()
    from_server, from_server_w = os.pipe()
    process = subprocess.Popen([sys.executable, "-I", SERVER_FILE, "--fds", str(to_server_r), str(from_server_w),
                                *args], pass_fds=(to_server_r, from_server_w), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    os.close(to_server_r)
    os.close(from_server_w)
    os.write(to_server, json.dumps({"type": "exec", "id": 1, "code": code}).encode() + b"\n")
    with os.fdopen(from_server, "rb") as stream:
        frames = [json.loads(line) for line in stream]
    os.close(to_server)
    process.wait(timeout=30)
    return frames, process


@pytest.mark.parametrize("attack, reason", [
    (FORGE_ON_OWN_PIPES, "answered a command that was not asked"),
    (OVERSIZE_ON_OWN_PIPES, "over the 1 MB limit (sandbox.repl.max_message_mb)")])
def test_the_server_tells_the_host_why_it_ended_the_repl(attack, reason):
    frames, process = _raw_exec(attack, "--max-frame-mb", "1")
    assert [f["type"] for f in frames] == ["hello", "exit"], frames
    assert frames[1]["reason"].startswith("protocol violation: ")
    assert reason in frames[1]["reason"]
    assert process.returncode == 1
    assert reason in process.stderr.read().decode()


def test_an_oversize_host_call_or_final_value_is_a_clear_error_in_the_cell(repl):
    big = repl.execute("llm_query('x' * 20_000_000)")
    assert big.error is not None
    assert "sandbox.repl.max_message_mb" in big.error.message
    assert "llm_query()" in big.error.message
    assert repl.calls == []  # never sent to the host
    final = repl.execute("keep = 1\nFINAL('y' * 20_000_000)")
    assert final.final is None
    assert "sandbox.repl.max_message_mb" in final.error.message
    assert repl.execute("llm_query('small')").value == "spied"
    assert repl.execute("keep").value == "1"  # the same REPL, not a restarted one
    assert repl.calls == ["small"]


def test_a_lone_surrogate_in_a_final_value_reaches_the_host(repl):
    result = repl.execute("keep = 1\nFINAL('\\ud800 and more')")
    assert result.error is None
    assert result.final["value"] in ("\ud800 and more", "\ufffd and more")  # the host may sanitize it
    assert repl.execute("print('\\udfff')").stdout == "\\udfff\n"
    assert repl.execute("keep").value == "1"  # the server survived


def test_cell_code_cannot_read_the_http_secret(fake_daytona):
    with make_sandbox(daytona_config(fake_daytona), name="secret") as sandbox:
        session = sandbox.open_repl()
        secret = session._conn.transport._post.headers["X-Rlm-Secret"]
        result = session.execute(
            "import gc, glob, os\n"
            "found = [repr(vars(o)) for o in gc.get_objects() if hasattr(o, '__dict__') and 'secret' in vars(o)]\n"
            "for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline') + "
            "glob.glob('/.rlm/*'):\n"
            "    try:\n"
            "        found.append(open(path, 'rb').read().decode(errors='replace'))\n"
            "    except OSError as exc:\n"
            "        found.append(f'{path}: {type(exc).__name__}')\n"
            "ppid = os.getppid()\n"
            "for name in ('environ', 'mem', 'fd/0'):\n"
            "    try:\n"
            "        open(f'/proc/{ppid}/{name}', 'rb').read(1)\n"
            "    except OSError as exc:\n"
            "        print('server', name, type(exc).__name__)\n"
            "print('\\n'.join(found))")
        assert result.error is None, result.error
        assert secret not in result.stdout
        for name in ("environ", "mem", "fd/0"):  # the process holding the secret is closed to cell code
            assert f"server {name} PermissionError" in result.stdout, result.stdout
        session.close()


# --------------------------------------------------------------------------- HTTP, raw


@pytest.fixture
def http_server(tmp_path):
    """`server.py --http` as a plain process on the host, with a 1 MB frame limit."""
    secret, port = "s3cret-" + os.urandom(8).hex(), free_port()
    (tmp_path / "secret").write_text(secret)
    process = subprocess.Popen([sys.executable, "-I", SERVER_FILE, "--http", str(port), "--secret-file",
                                str(tmp_path / "secret"), "--max-frame-mb", "1"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield process, port, secret
    os.killpg(process.pid, 9)
    process.wait()


def _request(port, head, timeout=20):
    """Send a request head (no body at all) and return the status code of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head.encode())
        answer = connection.recv(65536)
    return int(answer.split(b" ", 2)[1])


def _events(port, secret):
    head = f"GET /events?after=0&wait=20 HTTP/1.1\r\nHost: x\r\nX-Rlm-Secret: {secret}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head.encode())
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("length", ["Content-Length: -1\r\n", f"Content-Length: {10 ** 12}\r\n", ""])
def test_http_checks_the_secret_and_the_length_before_reading_a_body(http_server, length):
    _, port, secret = http_server
    post = "POST /messages HTTP/1.1\r\nHost: x\r\n"
    # No body follows: a server that reads one first never answers (recv times out).
    assert _request(port, post + length + "\r\n") == 403
    assert _request(port, post + "X-Rlm-Secret: guess\r\n" + length + "\r\n") == 403
    expected = 413 if "10000" in length else 400
    assert _request(port, post + f"X-Rlm-Secret: {secret}\r\n" + length + "\r\n") == expected


def test_idle_http_connections_hold_no_threads_and_the_host_still_gets_through(http_server):
    process, port, secret = http_server
    idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(100)]
    try:
        for connection in idle:
            connection.sendall(b"GET /events HTTP/1.1\r\n")  # a head that never ends
        status, body = _events(port, secret)  # served after every idle connection was accepted
        assert status == 200
        assert body["events"][0][1]["type"] == "hello"
        threads = len(os.listdir(f"/proc/{process.pid}/task"))
        assert threads < 16, threads
        assert _events(port, secret)[0] == 200
    finally:
        for connection in idle:
            connection.close()
    assert Path(f"/proc/{process.pid}").exists()


def _post(port, secret, seq, message):
    body = json.dumps({"seq": seq, "message": message}).encode()
    head = (f"POST /messages HTTP/1.1\r\nHost: x\r\nX-Rlm-Secret: {secret}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head.encode() + body)
        assert connection.recv(65536).split(b" ", 2)[1] == b"200"


def test_many_large_frames_queued_at_once_go_out_over_several_polls(http_server):
    """Eight concurrent host calls of 0.9 MB each (frame limit 1 MB) wait unanswered: no poll answer is
    larger than the host reads (4 frames), and every call arrives."""
    _, port, secret = http_server
    _post(port, secret, 1, {"type": "register", "id": 1, "tools": [{"name": "echo", "params": ["text"], "doc": ""}]})
    _post(port, secret, 2, {"type": "exec", "id": 2, "code": "import threading\n"
                            "threads = [threading.Thread(target=echo, args=('x' * 900_000,)) for _ in range(8)]\n"
                            "for thread in threads:\n    thread.start()\n"
                            "for thread in threads:\n    thread.join()"})  # the cell runs until answered
    calls, after, polls = 0, 0, 0
    while calls < 8 and polls < 40:
        head = (f"GET /events?after={after}&wait=5 HTTP/1.1\r\nHost: x\r\nX-Rlm-Secret: {secret}\r\n"
                "Connection: close\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
            connection.sendall(head.encode())
            data = b""
            while chunk := connection.recv(1 << 20):
                data += chunk
        body = data.partition(b"\r\n\r\n")[2]
        assert len(body) <= 4 * ((1 << 20) + 64 * 1024), len(body)
        events = json.loads(body)["events"]
        calls += sum(message["type"] == "call" for _, message in events)
        after, polls = (events[-1][0] if events else after), polls + 1
        time.sleep(0.3)  # let the calls queue up
    assert calls == 8


@contextlib.contextmanager
def raw_server():
    """`server.py` over stdio as a plain process on the host: (send a message, the stream of its frames)."""
    to_server_r, to_server = os.pipe()
    from_server, from_server_w = os.pipe()
    process = subprocess.Popen([sys.executable, "-I", SERVER_FILE, "--fds", str(to_server_r), str(from_server_w)],
                               pass_fds=(to_server_r, from_server_w), stdout=subprocess.DEVNULL,
                               start_new_session=True)
    os.close(to_server_r)
    os.close(from_server_w)

    def send(message):
        os.write(to_server, json.dumps(message).encode() + b"\n")  # ASCII: a lone surrogate as an escape

    try:
        with os.fdopen(from_server, "rb") as stream:
            yield send, stream
    finally:
        os.killpg(process.pid, 9)
        process.wait()
        os.close(to_server)


def test_no_host_call_goes_out_between_cells(tmp_path):
    """A thread a cell leaves behind calls a host function after the cell ended: the host never sees it."""
    said = tmp_path / "said"
    with raw_server() as (send, stream):
        def command(message):
            send(message)
            while True:
                frame = json.loads(stream.readline())
                assert frame["type"] in ("hello", "result"), frame  # never a call
                if frame["type"] == "result":
                    return frame

        command({"type": "register", "id": 1, "tools": [{"name": "spy", "params": [], "doc": ""}]})
        left = command({"type": "exec", "id": 2, "code": "import threading, time\n"
                        "def later():\n    time.sleep(0.5)\n    try:\n        spy()\n"
                        f"    except Exception as exc:\n        open({str(said)!r}, 'w').write(str(exc))\n"
                        "threading.Thread(target=later).start()"})
        assert left["error"] is None
        for _ in range(600):  # until the thread has called (no cell is running meanwhile)
            if said.exists() and said.read_text():
                break
            time.sleep(0.1)
        assert "host functions can only be called while a cell runs" in said.read_text()
        assert command({"type": "exec", "id": 3, "code": "spy"})["error"] is None  # the REPL goes on


def test_a_host_function_returning_a_lone_surrogate_does_not_break_the_server():
    with raw_server() as (send, stream):
        def frame(kind):
            message = json.loads(stream.readline())
            while message["type"] == "hello":
                message = json.loads(stream.readline())
            assert message["type"] == kind, message
            return message

        send({"type": "register", "id": 1, "tools": [{"name": "spy", "params": [], "doc": ""}], "final": True})
        frame("result")
        send({"type": "exec", "id": 2, "code": "value = spy()\nprint(value)\nFINAL(value)"})
        send({"type": "reply", "call_id": frame("call")["call_id"], "value": "\ud800!"})
        result = frame("result")
        assert result["final"] == {"kind": "final", "value": "\ud800!"}
        assert result["stdout"] == "\\ud800!\n"
        send({"type": "exec", "id": 3, "code": "6 * 7"})
        assert frame("result")["value"] == "42"
