"""Our sandbox interpreter against dspy's own interpreters, measured side by side in one run.

    bash benchmarks/setup_peers.sh          # once: Deno + Pyodide for dspy's default interpreter
    python benchmarks/interpreters.py [--quick]

Peers: our local sandbox (bubblewrap), the same without isolation, dspy's LocalInterpreter (a plain
subprocess), dspy's PythonInterpreter (Deno + Pyodide; see peers.py). Every peer runs the same code through
the dspy CodeInterpreter protocol, the way dspy.RLM drives it. A peer that cannot start is skipped with the
reason. Prints p50/p95 per figure, our ratio to each peer and the DESIGN targets; writes
benchmarks/results/interpreters.json. Start and warm-cell trials are taken in turns across the peers, so a
change of load on a shared machine falls on every peer alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks import peers

TARGETS_MS = {"start": 100, "warm": 1, "host_call": 0.5, "input_1mib": 2, "batch64": 250}
LABELS = {"start": "start to first result", "warm": "warm print(6*7)", "host_call": "host call round trip",
          "input_1mib": "1 MiB input, per iteration", "batch64": "64 batched llm_query, 100 ms LM"}
HOST_CALLS = 200  # ping() calls per cell; the figure is the cell's time / HOST_CALLS
ITERATIONS = 10  # the 1 MiB input: execute(code, variables={"doc": ...}) this many times, as RLM iterates
BATCH = 64
METHOD = {
    "start": "construct the interpreter + execute('print(6*7)'): a new interpreter each trial",
    "warm": "execute('print(6*7)') on a started interpreter with its tools registered",
    "host_call": f"one cell calling a registered tool ping() -> 'pong' {HOST_CALLS} times, cell time / {HOST_CALLS} "
                 "(the cell's own overhead is spread over the calls, not subtracted)",
    "input_1mib": f"execute('n = len(doc)', variables={{'doc': <1 MiB str>}}) {ITERATIONS} times, each timed; "
                  "the same dict each time, as dspy.RLM passes its inputs to every execute call",
    "batch64": f"execute(llm_query_batched({BATCH} prompts)) through the RLM's own tools; the sub-LM sleeps 100 ms",
}
ONE_MIB = "x" * (1 << 20)


class SlowLM:
    """A sub-LM with 100 ms latency: dspy's llm_query tools call it and take the first text."""

    def __call__(self, prompt: str, **kwargs: Any) -> list[str]:
        time.sleep(0.1)
        return [f"answer to {prompt[:12]}"]


def ping() -> str:
    return "pong"


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def start_once(peer: peers.Peer) -> float:
    """One start trial: a new interpreter to its first result (shut down outside the timing)."""
    made: list[Any] = []

    def first() -> None:
        made.append(peer.make({}))
        assert made[0].execute("print(6*7)").strip() == "42"

    try:
        return timed(first)
    finally:
        if made:
            made[0].shutdown()


def round_robin(peers_: list[peers.Peer], counts: dict[str, int], trial: Callable[[peers.Peer], list[float]],
                failed: dict[str, str]) -> dict[str, list[float]]:
    """Trials taken in turns, one peer after the other, so a change of load on a shared machine falls on every
    peer alike (measured one peer after the other, the ratios swung by half). A peer that fails is left out."""
    figures: dict[str, list[float]] = {peer.name: [] for peer in peers_}
    for turn in range(max(counts.values(), default=0)):
        for peer in peers_:
            if peer.name in failed or turn >= counts[peer.name]:
                continue
            try:
                figures[peer.name] += trial(peer)
            except Exception as exc:  # noqa: BLE001 - one broken peer must not hide the others
                failed[peer.name] = f"failed while measured: {type(exc).__name__}: {str(exc)[:300]}"
                print(f"SKIPPED {peer.name}: {failed[peer.name]}")
    return figures


WARM_TURN = 10  # warm cells per turn of the round robin


def measure_all(chosen: list[peers.Peer], quick: bool, failed: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """Start and warm-cell trials in turns across the peers; the other figures one peer after the other."""
    trials = {peer.name: trials_for(peer, quick) for peer in chosen}
    figures: dict[str, dict[str, list[float]]] = {peer.name: {k: [] for k in TARGETS_MS} for peer in chosen}
    print("start to first result, in turns ...", flush=True)
    starts = round_robin(chosen, {n: t["start"] for n, t in trials.items()}, lambda p: [start_once(p)], failed)
    interps: dict[str, Any] = {}
    try:
        for peer in chosen:
            if peer.name not in failed:
                interps[peer.name] = started(peer)
        print("warm cells, in turns ...", flush=True)
        warm = round_robin([p for p in chosen if p.name in interps],
                           {n: -(-t["warm"] // WARM_TURN) for n, t in trials.items()},
                           lambda p: [timed(lambda: interps[p.name].execute("print(6*7)")) for _ in range(WARM_TURN)],
                           failed)
        for peer in chosen:
            if peer.name in interps and peer.name not in failed:
                print(f"measuring {peer.name}: the other figures ...", flush=True)
                figures[peer.name].update(start=starts[peer.name], warm=warm[peer.name])
                try:
                    measure_rest(interps[peer.name], trials[peer.name], figures[peer.name])
                except Exception as exc:  # noqa: BLE001 - one broken peer must not hide the others
                    failed[peer.name] = f"failed while measured: {type(exc).__name__}: {str(exc)[:300]}"
                    print(f"SKIPPED {peer.name}: {failed[peer.name]}")
    finally:
        for interp in interps.values():
            interp.shutdown()
    return {name: f for name, f in figures.items() if name not in failed}


def started(peer: peers.Peer) -> Any:
    """An interpreter with ping() and the llm tools registered, started outside the timings."""
    interp = peer.make({"ping": ping, **peer.llm_tools(SlowLM())})
    interp.execute("print(6*7)")  # starts it and registers the tools
    assert interp.execute("print(ping())").strip() == "pong"
    return interp


def measure_rest(interp: Any, trials: dict[str, int], figures: dict[str, list[float]]) -> None:
    for _ in range(trials["host_call"]):
        figures["host_call"].append(timed(lambda: interp.execute(f"for _ in range({HOST_CALLS}): ping()"))
                                    / HOST_CALLS)
    inputs = {"doc": ONE_MIB}
    for _ in range(ITERATIONS):
        figures["input_1mib"].append(timed(lambda: interp.execute("n = len(doc)", inputs)))
    assert interp.execute("print(n)").strip() == str(len(ONE_MIB))
    batch = (f"r = llm_query_batched([f'prompt {{i}}' for i in range({BATCH})])\n"
             f"assert len(r) == {BATCH} and r[0].startswith('answer'), r[:2]")
    for _ in range(trials["batch64"]):
        figures["batch64"].append(timed(lambda: interp.execute(batch)))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the q-th value of the sorted trials)."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(-(-q * len(values) // 1)) - 1))]


def trials_for(peer: peers.Peer, quick: bool) -> dict[str, int]:
    slow = "Deno" in peer.name  # seconds per start: fewer of those trials, same counts otherwise
    if quick:
        return {"start": 3 if slow else 10, "warm": 50, "host_call": 10, "batch64": 3}
    return {"start": 10 if slow else 60, "warm": 300, "host_call": 30, "batch64": 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (about a minute)")
    parser.add_argument("--only", action="append", help="measure only peers whose name contains this")
    parser.add_argument("--daytona", action="store_true", help="also DaytonaSandbox against the local fake "
                        "Daytona API: the HTTP transport's cost (the targets are the local sandbox's)")
    args = parser.parse_args()

    candidates = [peers.ours("bwrap"), peers.ours("none"), peers.dspy_local(), peers.deno_pyodide()]
    names = ["ours (bwrap)", "ours (none)", "dspy LocalInterpreter", "dspy Deno/Pyodide"]
    if args.daytona:
        candidates.append(peers.ours_daytona())
        names.append("ours (daytona, fake API)")
    notes: dict[str, str] = {}
    skipped: dict[str, str] = {}
    chosen: list[peers.Peer] = []
    for name, (peer, note) in zip(names, candidates):
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        if peer is None:
            skipped[name] = note
            print(f"SKIPPED {name}: {note}")
        else:
            chosen.append(peer)
            notes[name] = note

    for peer in chosen:
        print(f"peer {peer.name}: {notes[peer.name]}", flush=True)
    measured = measure_all(chosen, args.quick, skipped)
    results = {name: {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "mean": sum(v) / len(v), "n": len(v)}
                      for k, v in figures.items()} for name, figures in measured.items()}

    shown = list(results)
    if not shown:
        sys.exit("no interpreter could be measured")
    width = max(22, *(len(n) + 2 for n in shown))
    print(f"\n{'figure, ms (p50 / p95)':32}" + "".join(f"{n:>{width}}" for n in shown) + "  target")
    for key, label in LABELS.items():
        cells = "".join(f"{results[n][key]['p50']:>{width - 11}.3f} /{results[n][key]['p95']:>9.3f}" for n in shown)
        print(f"{label:32}{cells}  <= {TARGETS_MS[key]:g}")
        if key == "input_1mib":  # a design that sends the input once pays on the first iteration: show the mean too
            print(f"{'  mean of the ' + str(ITERATIONS):32}" + "".join(f"{results[n][key]['mean']:>{width - 11}.3f}"
                                                                       + " " * 11 for n in shown))
    ours = [n for n in shown if n.startswith("ours")]
    for mine in ours:
        if "daytona" not in mine:  # the targets are the local sandbox's; a remote one is shown for its cost
            print(f"\ntargets, {mine} p50: " + ", ".join(
                f"{key} {'ok' if results[mine][key]['p50'] <= TARGETS_MS[key] else 'MISSED'}" for key in TARGETS_MS))
        others = [n for n in shown if n not in ours]
        print(f"ratio of {mine} p50 to each peer's p50 (below 1: ours faster):")
        for key, label in LABELS.items():
            print(f"  {label:32}" + "  ".join(f"{n}: {results[mine][key]['p50'] / results[n][key]['p50']:.3f}x"
                                               for n in others if results[n][key]["p50"] > 0))
    if not ours:
        print("\n(no ratios: our interpreter was not measured; see SKIPPED above)")
    print("\nhow each figure is measured:")
    for key, text in METHOD.items():
        print(f"  {key:11}{text}")
    for name, note in notes.items():
        if "Deno" in name:
            print(f"\nnote, {name}: {note}")

    out = Path(__file__).resolve().parent / "results" / "interpreters.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"results": results, "targets_ms": TARGETS_MS, "method": METHOD, "notes": notes,
                               "skipped": skipped, "quick": args.quick, "cpus": os.cpu_count(),
                               "python": sys.version.split()[0], "at": time.strftime("%Y-%m-%d %H:%M:%S")},
                              indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
