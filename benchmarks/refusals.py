"""The refused-sub-agents attack (issue 11, point 4), measured: run.json / result.json / data.js sizes and
the CLI's peak RSS when a hostile model's code calls rlm_query N times with the sandbox budget spent.

    python benchmarks/refusals.py [--calls 5000] [--task-kb 100] [--record-mb 20] [--source DIR]

The model is an OpenAI-compatible server on 127.0.0.1 (tests/fakes/openai_server.py) replying with the
attack code; the run is the real CLI with a real sandbox on a toy git repo. `--source DIR` runs another
checkout of the project (e.g. an older commit unpacked with `git archive`) through PYTHONPATH, for a
before/after comparison; DIR needs `rlm_pipelines/conf`, `rlm_pipelines/viewer` and `rlm_tasks` reachable
(symlinks to its `conf/`, `viewer/` and `tasks/`, as an install lays them out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from tests.fakes.openai_server import OpenAIServer  # noqa: E402
from tests.fixtures.todo_repo import build  # noqa: E402


def attack(calls: int, task_kb: int) -> str:
    return ("```python\n"
            f"for i in range({calls}):\n"
            f"    rlm_query(str(i) + ' ' + 'x' * {task_kb * 1000})\n"
            "print('y' * 30_000_000)\n"
            "FINAL('done')\n"
            "```")


def peak_rss_mb(process: subprocess.Popen) -> int:
    """The process's VmHWM (peak RSS) read until it exits."""
    peak = 0
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
        time.sleep(0.1)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--task-kb", type=int, default=100)
    parser.add_argument("--record-mb", type=int, default=20)
    parser.add_argument("--source", type=Path, help="another checkout of the project to run instead")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlm-bench-refusals-"))
    repo = build(work / "src")["path"]
    env = {**os.environ, "RLM_TEST_KEY": "k", "RLM_CACHE_DIR": str(work / "cache")}
    if args.source:
        env["PYTHONPATH"] = str(args.source.resolve())
    code = attack(args.calls, args.task_kb)

    def reply(request):
        return code if "[iteration 1/" in request["messages"][-1]["content"] else "```python\nFINAL('x')\n```"

    with OpenAIServer(reply=reply) as server:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "rlm_pipelines", "task=repo_todos", f"task.repo={repo}", "model=local",
             f"model.api_base={server.url}", "model.api_key_env=RLM_TEST_KEY", "orchestration.prefect=false",
             "orchestration.progress=false", "limits.max_sandboxes=1", f"limits.max_record_mb={args.record_mb}",
             "sandbox.repl.cell_timeout_s=600", "limits.wall_time_s=1200"],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = peak_rss_mb(process)
        stderr = process.communicate()[1]
        wall = time.monotonic() - started
    run_dir = next((work / "outputs" / "runs").glob("*/*/*"))
    print(f"source: {args.source or ROOT}; {args.calls} refused rlm_query calls with {args.task_kb} KB tasks")
    print(f"exit code {process.returncode}; wall time {wall:.1f} s; CLI peak RSS {peak} MB")
    for name in ("run.json", "result.json", "viewer/data.js"):
        path = run_dir / name
        print(f"{name}: {path.stat().st_size / 1e6:.2f} MB" if path.is_file() else f"{name}: missing")
    print("last console lines:", *stderr.strip().splitlines()[-3:], sep="\n  ")


if __name__ == "__main__":
    main()
