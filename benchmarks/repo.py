"""The repo engine's costs: one sub-agent's sandbox + fresh checkout, and a 40-agent tree.

    python benchmarks/repo.py [--size-mb 50] [--rounds 10]

1. A sub-agent's sandbox + fresh checkout of a ~50 MB repository (target p50 <= 300 ms), side by side with
   peers measured in the same run: a plain `git clone --local` on the host (no sandbox), and a full copy
   `git clone --no-local` (what cloning from the remote for every child, as the Daytona guide does, costs
   at best: no network).
2. A 41-agent tree (root, 25 at depth 1, 15 at depth 2, as in the guide's scikit-learn example) on a
   zero-latency scripted model: wall time (target <= 15 s on 2 cores) and peak memory of this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from omegaconf import OmegaConf  # noqa: E402

from rlm_pipelines.config import LocalSandboxConfig  # noqa: E402
from rlm_pipelines.engines import checkout  # noqa: E402
from rlm_pipelines.models.scripted import DepthScript, Turn, register_script  # noqa: E402
from rlm_pipelines.sandbox import REPO_DIR, make_sandbox  # noqa: E402


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_repo(folder: Path, size_mb: int) -> Path:
    """A repository of incompressible files, ~size_mb in the working tree, in 40 packages."""
    repo = folder / "big"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    per_file = 25_000
    for i in range(size_mb * 1_000_000 // per_file):
        path = repo / f"pkg{i % 40}" / f"module_{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"# TODO: item {i}\n" + os.urandom(per_file // 2).hex() + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "big")
    return repo


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def checkout_costs(repo: Path, rounds: int) -> dict[str, list[float]]:
    mirror, commit = checkout.prepare_mirror(str(repo), None, None)
    base = checkout.make_base(mirror, commit)  # once per run, shared by every sub-agent
    figures: dict[str, list[float]] = {"ours: sub-agent sandbox + checkout": [],
                                       "ours: root agent (sandbox + git checkout)": [],
                                       "host git clone --local (no sandbox)": [],
                                       "host git clone --no-local (full copy)": []}
    for _ in range(rounds):
        started = time.perf_counter()
        sandbox = make_sandbox(LocalSandboxConfig(isolation="bwrap"), mounts={str(mirror): checkout.MIRROR_IN_SANDBOX})
        sandbox.start()
        assert sandbox.seed(base, REPO_DIR)
        figures["ours: sub-agent sandbox + checkout"].append((time.perf_counter() - started) * 1000)
        code, out = sandbox.run(f"cd {REPO_DIR} && git status --short | wc -l && git log --oneline | wc -l")
        assert code == 0 and out.split() == ["0", "1"], out
        sandbox.stop()
        started = time.perf_counter()
        sandbox = make_sandbox(LocalSandboxConfig(isolation="bwrap"), mounts={str(mirror): checkout.MIRROR_IN_SANDBOX})
        sandbox.start()
        code, out = sandbox.run(checkout.checkout_command(commit))
        figures["ours: root agent (sandbox + git checkout)"].append((time.perf_counter() - started) * 1000)
        assert code == 0, out
        sandbox.stop()
        for name, flag in (("host git clone --local (no sandbox)", "--local"),
                           ("host git clone --no-local (full copy)", "--no-local")):
            target = Path(tempfile.mkdtemp(prefix="bench-clone-"))
            started = time.perf_counter()
            git(target, "clone", "-q", flag, str(mirror), "repo")
            figures[name].append((time.perf_counter() - started) * 1000)
            shutil.rmtree(target)
    shutil.rmtree(base.parent)
    return figures


def tree_of_41(repo: Path, work: Path) -> dict[str, float]:
    from rlm_pipelines.orchestration.inprocess import run_steps
    from tests.test_config import composed

    register_script("tree41", DepthScript({
        0: [Turn("out = rlm_query_batched([f'part {i}' for i in range(25)])\nprint(len(out))"),
            Turn("FINAL(f'{len(out)} parts done')")],
        1: [Turn("import re\nn = int(re.search(r'part (\\d+)', task).group(1))\n"
                 "sub = rlm_query(f'detail of part {n}') if n < 15 else 'none'\nprint(sub)"),
            Turn("FINAL(f'part {n}: ' + sub)")],
        2: [Turn("print(sh('git rev-parse --short HEAD'))\nFINAL('detail ok')")],
    }))
    config = OmegaConf.to_container(composed(
        "task=repo_todos", f"task.repo={repo}", "model=scripted", "model.model=scripted/tree41",
        "orchestration.prefect=false", "orchestration.progress=false", "limits.max_sandboxes=100"), resolve=True)
    started = time.perf_counter()
    summary = run_steps(config, str(work / "tree-run"))
    wall = time.perf_counter() - started
    peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:")) / 1024
    assert summary["status"] == "ok" and summary["agents"] == 41, summary
    return {"agents": summary["agents"], "wall_s": wall, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-repo-"))
    os.environ["RLM_CACHE_DIR"] = str(work / "cache")
    try:
        repo = make_repo(work, args.size_mb)
        size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts) / 1e6
        print(f"repository: {size:.0f} MB working tree, {sum(1 for _ in repo.rglob('*.py'))} files")
        figures = checkout_costs(repo, args.rounds)
        ours = statistics.median(figures["ours: sub-agent sandbox + checkout"])
        print(f"\n{'one sub-agent: sandbox + fresh checkout (ms)':48}{'p50':>10}{'p95':>10}{'ours / peer':>13}")
        for name, values in figures.items():
            print(f"  {name:46}{pct(values, 0.5):10.1f}{pct(values, 0.95):10.1f}"
                  f"{ours / statistics.median(values):12.2f}x")
        print(f"  target: p50 <= 300 ms -> {'ok' if ours <= 300 else 'MISSED'}")
        (work / "small").mkdir()
        small = make_repo(work / "small", 1)
        print(f"\n41-agent tree (root, 25 at depth 1, 15 at depth 2), zero-latency scripted model, "
              f"{os.cpu_count()} cores:")
        for label, where in (("1 MB repo", small), (f"{args.size_mb} MB repo", repo)):
            tree = tree_of_41(where, work / label.replace(" ", "-"))
            print(f"  {label:12} wall time {tree['wall_s']:5.1f} s (target <= 15 s -> "
                  f"{'ok' if tree['wall_s'] <= 15 else 'MISSED'}), peak RSS of this process "
                  f"{tree['peak_rss_mb']:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
