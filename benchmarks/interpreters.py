"""Our sandbox interpreter against dspy's own interpreters, measured side by side in one run.

    python benchmarks/interpreters.py [--quick]

Peers: our local sandbox (bubblewrap), the same without isolation, dspy's LocalInterpreter (a plain
subprocess), dspy's PythonInterpreter (Deno + Pyodide; see peers.py). Every peer runs the same code through
the dspy CodeInterpreter protocol, the way dspy.RLM drives it. Prints p50/p95 per figure and our ratio to
each peer; writes benchmarks/results/interpreters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks import peers  # noqa: E402

TARGETS_MS = {"start": 100, "warm": 1, "host_call": 0.5, "input_1mib": 2, "batch64": 250}
LABELS = {"start": "start to first result", "warm": "warm print(6*7)", "host_call": "host call round trip",
          "input_1mib": "1 MiB input, per iteration", "batch64": "64 batched llm_query (100 ms LM)"}
ONE_MIB = "x" * (1 << 20)


class SlowLM:
    """A sub-LM with 100 ms latency, called through dspy's own llm_query wiring."""

    def __call__(self, prompt: str, **kwargs: Any) -> list[str]:
        time.sleep(0.1)
        return [f"answer to {prompt[:10]}"]


def llm_tools(ours: bool) -> dict[str, Callable]:
    import dspy

    from rlm_pipelines.engines.document import SandboxRLM

    kind = SandboxRLM if ours else dspy.RLM
    extra = {"sandbox": None} if ours else {}
    return kind("q -> a", sub_lm=SlowLM(), max_llm_calls=100_000, **extra)._make_llm_tools()


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def measure(factory: Callable[[], Any], ours: bool, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {k: [] for k in TARGETS_MS}
    for _ in range(max(3, rounds // 10)):
        interp = factory()
        figures["start"].append(timed(lambda: interp.execute("print(6*7)")))
        interp.shutdown()

    interp = factory()
    interp.tools.update({"ping": lambda: "pong", **llm_tools(ours)})
    interp._tools_registered = False
    try:
        interp.execute("print(6*7)")
        for _ in range(rounds):
            figures["warm"].append(timed(lambda: interp.execute("print(6*7)")))
        calls = 50
        for _ in range(max(5, rounds // 20)):
            figures["host_call"].append(timed(lambda: interp.execute(f"for _ in range({calls}): ping()")) / calls)
        for _ in range(10):  # as dspy.RLM does: the inputs are passed to every execute call
            figures["input_1mib"].append(timed(lambda: interp.execute("n = len(doc)", {"doc": ONE_MIB})))
        for _ in range(3):
            figures["batch64"].append(timed(lambda: interp.execute(
                "r = llm_query_batched([f'prompt {i}' for i in range(64)]); assert len(r) == 64")))
    finally:
        interp.shutdown()
    return figures


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 50 if args.quick else 200

    candidates: dict[str, tuple[Callable[[], Any], bool, str]] = {
        "ours (bwrap)": (peers.ours("bwrap"), True, "our sandbox, bubblewrap isolation"),
        "ours (none)": (peers.ours("none"), True, "our sandbox without isolation"),
        "dspy LocalInterpreter": (peers.dspy_local(), False, "plain subprocess, no isolation"),
    }
    deno, note = peers.deno_pyodide()
    if deno is not None:
        candidates["dspy Deno/Pyodide"] = (deno, False, note)
    else:
        print(f"skipped dspy Deno/Pyodide: {note}")

    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, (factory, ours, about) in candidates.items():
        print(f"measuring {name} ({about}) ...", flush=True)
        peer_rounds = rounds if "Deno" not in name else max(20, rounds // 4)
        figures = measure(factory, ours, peer_rounds)
        results[name] = {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "n": len(v)} for k, v in figures.items()}

    names = list(results)
    print(f"\n{'figure (ms)':34}" + "".join(f"{n:>24}" for n in names) + f"{'target':>9}")
    for key, label in LABELS.items():
        cells = "".join(f"{results[n][key]['p50']:>12.3f} /{results[n][key]['p95']:>9.3f}" for n in names)
        ok = "ok" if results[names[0]][key]["p50"] <= TARGETS_MS[key] else "MISSED"
        print(f"{label:34}{cells}{'<= ' + str(TARGETS_MS[key]):>9} {ok}")
    print("(each cell: p50 / p95)\n\nratio of ours (bwrap) p50 to each peer's p50 (below 1 = ours faster):")
    for key, label in LABELS.items():
        ratios = "  ".join(f"{n}: {results[names[0]][key]['p50'] / results[n][key]['p50']:.2f}x"
                           for n in names[1:] if results[n][key]["p50"] > 0)
        print(f"  {label:34}{ratios}")

    out = Path(__file__).resolve().parent / "results" / "interpreters.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"results": results, "targets_ms": TARGETS_MS, "deno_note": note,
                               "cpus": os.cpu_count(), "python": sys.version.split()[0],
                               "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"\nwrote {out}")
    medians = {k: statistics.median([results[n][k]["p50"] for n in names]) for k in TARGETS_MS}
    print("median p50 across peers:", {k: round(v, 3) for k, v in medians.items()})


if __name__ == "__main__":
    main()
