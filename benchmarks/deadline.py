"""How long a document run takes when its cell outlives limits.wall_time_s (issue 11, point 15).

    python benchmarks/deadline.py [--wall-time-s 15] [--cell-s 60]

Runs `python -m rlm_pipelines task=needles model=local` (in-process steps) against the fake OpenAI server of
tests/fakes, whose model answers with one cell that loops for --cell-s seconds. With the deadline enforced
the run ends shortly after --wall-time-s with status `timeout`; without it, after the whole cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.openai_server import OpenAIServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wall-time-s", type=float, default=15)
    parser.add_argument("--cell-s", type=float, default=60)
    options = parser.parse_args()
    cell = f"import time\nstarted = time.time()\nwhile time.time() - started < {options.cell_s}:\n    time.sleep(0.05)"
    reply = f"[[ ## reasoning ## ]]\nwork\n\n[[ ## code ## ]]\n{cell}\n\n[[ ## completed ## ]]"
    with tempfile.TemporaryDirectory(prefix="rlm-deadline-") as tmp, OpenAIServer(reply=reply) as server:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "rlm_pipelines", "task=needles", "task.documents=2",
                               "task.doc_chars=200", "model=local", f"model.api_base={server.url}",
                               "model.model=openai/root", "orchestration.prefect=false",
                               f"limits.wall_time_s={options.wall_time_s:g}"], cwd=tmp, capture_output=True, text=True)
        seconds = time.monotonic() - started
        runs = list(Path(tmp).glob("outputs/runs/*/*/*/run.json"))
        tree = json.loads(runs[0].read_text()) if runs else {}
    print(f"limits.wall_time_s={options.wall_time_s:g}, a {options.cell_s:g} s cell: the CLI ended after "
          f"{seconds:.1f} s, exit {done.returncode}, status {tree.get('status')}: {tree.get('error')}")


if __name__ == "__main__":
    main()
