"""The host side of the REPL, run in a process of its own so its peak memory can be measured: runs cells in
a `ReplSession` and prints what each gave plus the process's peak RSS, as JSON on stdout.

    python -m tests.fakes.repl_host stdio|http|bwrap|readline MAX_MESSAGE_MB CELL [CELL ...]

A CELL starting with `py:` is a Python string literal (for code a command line cannot carry, e.g. a lone
surrogate). The session gets inputs holding lone surrogates: `doc` (small, sent in the message) and `large`
(over 64 KB, sent as a file where the sandbox can stage one).

stdio / http: the REAL transports (`StdioTransport` over a subprocess, `HttpTransport` over a local HTTP
server) to `hostile_repl.py`; bwrap: a real bubblewrap `LocalSandbox` and its own REPL server; readline:
no session at all, the unbounded reading the host did before frames were bounded (a plain `readline` and
`json.loads` of what `hostile_repl.py` sends), for the benchmark's comparison.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlm_pipelines.config import LocalSandboxConfig, ReplConfig
from rlm_pipelines.repl.http import HttpTransport
from rlm_pipelines.repl.session import ReplSession
from rlm_pipelines.repl.stdio import StdioTransport

HOSTILE = Path(__file__).resolve().parent / "hostile_repl.py"


def tools(limit_mb: int) -> dict:
    return {
        "echo": lambda text: len(text),
        "big": lambda: "y" * (limit_mb * (1 << 20) + 10),
        "one_mb": lambda: "y" * (1 << 20),
        "surr": lambda: "a\ud800b",
        "slow": lambda: time.sleep(0.5) or 1,
        "llm_query": lambda prompt: f"{len(prompt)} characters",
    }


def stdio_spawn(limit_mb: int):
    def start(args: list[str], fds: tuple[int, int]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(HOSTILE), "--max-frame-mb", str(limit_mb), *args],
                                pass_fds=fds, start_new_session=True, stderr=subprocess.DEVNULL)
    return lambda: StdioTransport(start, [], stall_s=2)


class LocalProcess:
    """`RemoteProcess` for an HTTP server that is a local process."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def exit_info(self) -> str:
        return f"exit code {self.process.poll()}"


def http_spawn(limit_mb: int):
    def spawn() -> HttpTransport:
        port_file = Path(tempfile.mkdtemp()) / "port"
        process = subprocess.Popen([sys.executable, str(HOSTILE), "--max-frame-mb", str(limit_mb), "--http",
                                    str(port_file)], stderr=subprocess.DEVNULL)
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        return HttpTransport(f"http://127.0.0.1:{port_file.read_text()}", {"X-Rlm-Secret": "s"},
                             LocalProcess(process), retry_s=5, poll_s=5)
    return spawn


def run_session(session: ReplSession, limit_mb: int, cells: list[str]) -> list[dict]:
    out = []
    with session:
        session.register(tools(limit_mb))
        session.set_vars({"doc": "a\ud800b"})
        session.set_vars({"large": "\ud800" + "x" * 70_000})
        for code in cells:
            code = ast.literal_eval(code[3:]) if code.startswith("py:") else code
            result = session.execute(code)
            out.append({"stdout": result.stdout, "output": result.output(), "final": result.final,
                        "error": str(result.error) if result.error else None, "notice": result.notice})
    return out


def readline_attack(limit_mb: int, cells: list[str]) -> list[dict]:
    """What the host did before: read whole lines, decode them, then look at them."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    process = subprocess.Popen([sys.executable, str(HOSTILE), "--fds", str(to_r), str(from_w)],
                               pass_fds=(to_r, from_w), stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    stream = os.fdopen(from_r, "rb")
    stream.readline()  # hello
    os.write(to_w, json.dumps({"type": "exec", "id": 1, "code": cells[0]}).encode() + b"\n")
    line = stream.readline()
    size = len(json.loads(line)["args"][0]) if line.endswith(b"\n") else len(line)
    process.kill()
    return [{"read_bytes": size}]


def peak_rss_kb() -> int:
    """This process's peak RSS since it started (VmHWM: ru_maxrss would carry the peak of the process it
    was forked from, e.g. a large pytest)."""
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def main() -> None:
    mode, limit_mb, cells = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    config = ReplConfig(max_message_mb=limit_mb, cell_timeout_s=60, host_workers=2)
    if mode == "readline":
        results = readline_attack(limit_mb, cells)
    elif mode == "bwrap":
        from rlm_pipelines.sandbox.local import LocalSandbox
        with LocalSandbox(LocalSandboxConfig(isolation="bwrap", memory_mb=4096, repl=config)) as box:
            results = run_session(box.open_repl(), limit_mb, cells)
    else:
        spawn = stdio_spawn(limit_mb) if mode == "stdio" else http_spawn(limit_mb)
        results = run_session(ReplSession(spawn, config), limit_mb, cells)
    peak_mb = peak_rss_kb() / 1024
    print(json.dumps({"cells": results, "peak_rss_mb": round(peak_mb, 1)}))


if __name__ == "__main__":
    main()

