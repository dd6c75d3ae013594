"""The CLI's peak memory with a large task.source under limits.max_input_mb (issue 11, point 16).

    python benchmarks/input_memory.py [--mb 200] [--max-input-mb 256] [--iterations 1]

Makes a synthetic Monte Cristo of about --mb MB (117 chapters with the book's headings, some accented text
so Python holds it as it holds the real book), runs `python -m rlm_pipelines task=monte_cristo
model=scripted` on it (in-process steps, no Prefect), and samples the CLI process's own peak RSS (VmHWM in
/proc; the sandbox's processes are not counted). One iteration (the default) measures the inputs' way into
the sandbox; more add the scripted fan-out of llm_query prompts (each holding chapters) on top. Prints the
figures and the run's status; a source over --max-input-mb ends at once with exit code 2 and a small peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHAPTERS = 117
LINE = "Dantès looked at the sea, and the abbé counted the diamonds of the treasure once again.\n"


def make_source(path: Path, megabytes: int) -> None:
    per_chapter = megabytes * 2**20 // CHAPTERS // len(LINE.encode())
    with open(path, "w", encoding="utf-8") as out:
        out.write("*** START OF THE PROJECT GUTENBERG EBOOK ***\n\n")
        for number in range(1, CHAPTERS + 1):
            out.write(f"\n\nChapter {number}. A chapter\n\n")
            out.write(LINE * per_chapter)
        out.write("\n*** END OF THE PROJECT GUTENBERG EBOOK ***\n")


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(source: Path, max_input_mb: int, iterations: int, cwd: Path) -> tuple[int, float, float, str]:
    """(exit code, the CLI's peak RSS in MB, seconds, the last lines of stderr)."""
    args = [sys.executable, "-m", "rlm_pipelines", "task=monte_cristo", "model=scripted", f"task.source={source}",
            f"limits.max_input_mb={max_input_mb}", "orchestration.prefect=false", "limits.wall_time_s=120",
            f"limits.max_iterations={iterations}"]
    started = time.monotonic()
    with open(cwd / "stderr.txt", "w") as err:
        process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                                   env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid))
            time.sleep(0.05)
    tail = "\n".join((cwd / "stderr.txt").read_text().splitlines()[-3:])
    return process.returncode, peak, time.monotonic() - started, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--max-input-mb", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=1)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlm-input-memory-") as tmp:
        source = Path(tmp) / "book.txt"
        make_source(source, options.mb)
        size = source.stat().st_size / 2**20
        code, peak, seconds, tail = run(source, options.max_input_mb, options.iterations, Path(tmp))
    print(f"task.source {size:.0f} MB, limits.max_input_mb={options.max_input_mb}, {options.iterations} "
          f"iteration(s): exit {code} after "
          f"{seconds:.1f} s, CLI peak RSS {peak:.0f} MB ({peak / size:.1f}x the source)")
    print(tail)


if __name__ == "__main__":
    main()
