"""Host peak memory under REPL channel attacks (issue 11, point 2): bounded frames against the unbounded
reading the host did before.

    python benchmarks/repl_bounds.py

Each figure is the peak RSS (VmHWM) of a child process running the host side of one attack
(`tests/fakes/repl_host.py`) against a hostile server (`tests/fakes/hostile_repl.py`) through the real
transports, or a real bubblewrap sandbox running our REPL server:
    long-line     1.5 GB without a newline on the stdio channel (and as an endless HTTP poll body)
    call-400mb    one 400 MB host-call frame, what `llm_query('x' * 400_000_000)` sends unless the server
                  refuses it first
"unbounded" is a plain `readline` + `json.loads` of the same bytes, how the host read frames before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
LIMIT_MB = 8  # sandbox.repl.max_message_mb's default

CASES = [
    ("idle: one honest cell", "stdio", ["ok"]),
    ("1.5 GB line, stdio, bounded", "stdio", ["long-line"]),
    ("1.5 GB line, stdio, unbounded readline", "readline", ["long-line"]),
    ("1.5 GB poll body, HTTP, bounded", "http", ["long-line"]),
    ("400 MB call frame, stdio, bounded", "stdio", ["call-400mb"]),
    ("400 MB call frame, stdio, unbounded readline", "readline", ["call-400mb"]),
    ("llm_query('x' * 400_000_000), bubblewrap, bounded", "bwrap", ["x = llm_query('x' * 400_000_000)"]),
]


def measure(mode: str, cells: list[str]) -> tuple[float, float, str]:
    """Peak RSS (MB) of the host, seconds taken, and what the first cell said (its first line)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tests.fakes.repl_host", mode, str(LIMIT_MB), *cells],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return float("nan"), time.monotonic() - started, "failed: " + done.stderr.strip()[-200:]
    report = json.loads(done.stdout)
    cell = report["cells"][0]
    said = cell.get("error") or cell.get("stdout") or f"read {cell.get('read_bytes', 0) / 2**20:.0f} MB"
    return report["peak_rss_mb"], time.monotonic() - started, said.splitlines()[0][:110]


def main() -> None:
    print(f"host peak RSS per attack (sandbox.repl.max_message_mb = {LIMIT_MB})\n")
    print(f"{'attack':<52} {'peak RSS':>10} {'time':>7}  outcome")
    for label, mode, cells in CASES:
        peak, seconds, said = measure(mode, cells)
        print(f"{label:<52} {peak:>7.0f} MB {seconds:>6.1f}s  {said}")


if __name__ == "__main__":
    main()
