"""Peak memory of the CLI when the root agent leaves a huge patch (issue 11, point 3).

    python benchmarks/patch_memory.py [--size-mb 110] [--project DIR]

The root agent (a local OpenAI-compatible fake playing the model) writes `--size-mb` MB of random bytes
into its checkout and answers; the CLI then makes the patch. Prints the CLI's own peak RSS, its exit code,
wall time and the sizes of what the run folder holds. `--project DIR` runs the CLI of another checkout of
this project (e.g. the code before the fix) with the same fake model and repo.
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

from tests.fakes.cli_peak import CLI_WITH_PEAK  # noqa: E402
from tests.fakes.openai_server import OpenAIServer  # noqa: E402
from tests.fixtures.todo_repo import build  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=110)
    parser.add_argument("--project", default=str(ROOT))
    args = parser.parse_args()
    cell = ("import os\nwith open('/workspace/repo/big.bin', 'wb') as f:\n"
            f"    for _ in range({args.size_mb}):\n        f.write(os.urandom(1 << 20))\n")
    with tempfile.TemporaryDirectory(prefix="rlm-bench-patch-") as tmp:
        repo = build(Path(tmp) / "repo")
        env = {**os.environ, "RLM_TEST_KEY": "k", "RLM_CACHE_DIR": f"{tmp}/cache", "PYTHONPATH": args.project}
        with OpenAIServer(reply=lambda request: f"```python\n{cell}FINAL('done')\n```") as server:
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-c", CLI_WITH_PEAK, "task=repo_todos",
                                   f"task.repo={repo['path']}", "model=local", f"model.api_base={server.url}",
                                   "model.api_key_env=RLM_TEST_KEY", "orchestration.prefect=false",
                                   f"sandbox.file_size_mb={args.size_mb + 50}"], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            wall = time.monotonic() - started
        peak = [int(line.split("=")[1]) >> 10 for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
        files = {str(p.relative_to(tmp)): p.stat().st_size >> 20 for p in Path(tmp, "outputs").rglob("*")
                 if p.is_file() and p.stat().st_size >= 1 << 20}
    print(f"project {args.project}: {args.size_mb} MB written by the root agent")
    print(f"  CLI peak RSS {peak[-1] if peak else '?'} MB, exit {done.returncode}, {wall:.1f} s")
    print(f"  run files of 1 MB or more (MB): {files or 'none'}")
    print("  last console lines:", *done.stderr.strip().splitlines()[-3:], sep="\n    ")


if __name__ == "__main__":
    main()
