"""Record/replay and the call cache (issue 13): what a lookup costs, and what a replay saves.

    python benchmarks/replay.py [--entries 100000] [--latency-s 1] [--children 3] [--leaves 12]

1. Cache lookup overhead per call: a `Calls` with a `DiskCache` of --entries entries (made first, in a temp
   dir), answering a 10,000-character prompt: key hashing + the file read + the record line, per call (p50,
   p95), hits and misses.
2. Replay wall time vs the original, with the fake OpenAI server answering after --latency-s: a document run
   (needles: 2 root turns, 4 sub calls, 3 of them in one batch) and a depth-2 repo run of
   1 + children + children * leaves agents (concurrent sub-agents), each recorded over real HTTP and replayed
   with `model=replay` and the server stopped; and the offline Monte Cristo run (4 root turns, 39 sub calls
   in one batch) with its scripted policy served over HTTP, when the book is at --book.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlm_pipelines.models.callstore import Answer, Calls, DiskCache, call_key, request_of  # noqa: E402
from tests.fakes.openai_server import OpenAIServer  # noqa: E402
from tests.fakes.rlm_replies import DOCUMENT_TASK, document_root, document_sub  # noqa: E402


def lookup_overhead(entries: int) -> None:
    with tempfile.TemporaryDirectory(prefix="rlm-cache-bench-") as tmp:
        cache = DiskCache(Path(tmp) / "calls")
        started = time.perf_counter()
        keys = []
        for i in range(entries):
            key = f"{random.getrandbits(256):064x}"
            keys.append(key)
            cache.record({"key": key, "response": {"text": f"answer {i} " * 20}, "usage": {}, "cost_usd": 0.001})
        print(f"cache of {entries:,} entries written in {time.perf_counter() - started:.1f} s")
        calls = Calls(Path(tmp) / "run" / "calls.jsonl", cache=cache)
        prompt = "x" * 10_000

        def one(hit: bool) -> float:
            request = request_of("openai/m", [{"role": "user", "content": prompt + str(random.random())}],
                                 {"temperature": 0.0})
            if hit:  # a stored entry under this request's key
                cache.record({"key": call_key(request), "response": {"text": "cached"}, "usage": {},
                              "cost_usd": 0.001})
            t = time.perf_counter()
            calls.call(request, lambda: Answer({"text": "live"}, 1, 1, 0.0), "root", use_cache=True)
            return (time.perf_counter() - t) * 1000

        for label, hit in (("hit", True), ("miss (the live answer stored)", False)):
            times = sorted(one(hit) for _ in range(2000))
            print(f"  per call, {label}: p50 {statistics.median(times):.3f} ms, p95 {times[int(len(times) * .95)]:.3f} ms")


def _cli(args: list[str], cwd: Path, env: dict) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.monotonic() - started


def _run_dir(cwd: Path) -> Path:
    return next(cwd.glob("outputs/runs/*/*/*"))


def repo_reply(children: int, leaves: int):
    def reply(request):
        system, last = request["messages"][0]["content"], request["messages"][-1]["content"]
        if "depth 2 of" in system:
            return "```python\nFINAL('leaf: ' + task[-40:])\n```"
        if "[iteration 1/" in last:
            n = children if "depth 0 of" in system else leaves
            return f"```python\nprint(rlm_query_batched([task[-30:] + f' / part {{i}}' for i in range({n})]))\n```"
        return "```python\nFINAL('done' if depth == 0 else 'mid')\n```"
    return reply


def monte_cristo_servers(latency: float) -> tuple:
    """The Monte Cristo task's scripted policy served over HTTP: root turns and sub calls on one server."""
    from rlm_pipelines.models import scripted
    from rlm_tasks.monte_cristo import task as monte_cristo

    scripted.register_script("bench", monte_cristo.script(monte_cristo.params()))
    return (OpenAIServer(reply=lambda request: scripted.reply(
        "scripted/bench.sub" if request["model"] == "bench-sub" else "scripted/bench", request["messages"]),
        latency_s=latency),)


def replay_times(latency: float, children: int, leaves: int, book: Path) -> None:
    from tests.fixtures.todo_repo import build

    with tempfile.TemporaryDirectory(prefix="rlm-replay-bench-") as tmp:
        tmp = Path(tmp)
        env = {"RLM_CACHE_DIR": str(tmp / "cache")}
        repo = build(tmp / "repo")
        agents = 1 + children + children * leaves
        cases = {
            "document (needles)": (DOCUMENT_TASK, lambda: (OpenAIServer(reply=document_root, latency_s=latency),
                                                           OpenAIServer(reply=document_sub, latency_s=latency))),
            f"repo, {agents} agents": (["task=repo_todos", f"task.repo={repo['path']}",
                                        f"limits.max_sandboxes={agents + 5}"],
                                       lambda: (OpenAIServer(reply=repo_reply(children, leaves), latency_s=latency),)),
        }
        if book.exists():
            cases["document (Monte Cristo)"] = (["task=monte_cristo", f"task.source={book}"],
                                                lambda: monte_cristo_servers(latency))
        for name, (task, servers) in cases.items():
            out, back = tmp / f"{len(name)}-original", tmp / f"{len(name)}-replay"
            out.mkdir(), back.mkdir()
            started = [s.start() for s in servers()]
            model = ["model=local", f"model.api_base={started[0].url}", "model.cache=false"]
            if len(started) > 1:
                model += ["model.model=openai/root", "model.sub.model=openai/sub", f"model.sub.api_base={started[1].url}"]
            elif "Monte Cristo" in name:
                model += ["model.model=openai/bench-root", "model.sub.model=openai/bench-sub"]
            try:
                original = _cli([*task, *model, "orchestration.prefect=false"], out, env)
            finally:
                requests = sum(len(s.requests) for s in started)
                for s in started:
                    s.stop()
            replay = _cli([*task, "model=replay", f"model.source={_run_dir(out)}", "orchestration.prefect=false"],
                          back, env)
            summary = json.loads((_run_dir(back) / "summary.json").read_text())
            print(f"{name}: {requests} model calls at {latency:g} s: original {original:.1f} s, replay "
                  f"{replay:.1f} s (server stopped; {summary['replayed_calls']} calls replayed, status "
                  f"{summary['status']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--latency-s", type=float, default=1.0)
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--leaves", type=int, default=12)
    parser.add_argument("--book", type=Path,
                        default=Path(__file__).resolve().parent.parent.parent / "shared/data/monte_cristo/1184-0.txt")
    options = parser.parse_args()
    lookup_overhead(options.entries)
    replay_times(options.latency_s, options.children, options.leaves, options.book)


if __name__ == "__main__":
    main()
