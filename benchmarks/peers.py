"""The interpreters benchmarks/interpreters.py measures, each a `Peer`: `make(tools)` returns a dspy
CodeInterpreter (start/execute/shutdown/tools) with `tools` registered; `llm_tools()` returns the
llm_query/llm_query_batched tools that RLM variant would register (dspy's own wiring, with its fan-out).

dspy's default `PythonInterpreter` (Deno + Pyodide) runs here through its public `deno_command` parameter,
with the same arguments dspy builds by default plus one: an import map (BENCHMARK-ONLY, made by
benchmarks/setup_peers.sh) sending the one deno.land URL dspy's runner.js imports (`readLines`; machines
without internet cannot reach deno.land) to a local line reader. dspy's runner.js itself is unmodified;
Deno and Pyodide come from package registries. The benchmark prints this note.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
OUR_BATCH_CONCURRENCY = 32  # what our RLM adapter fans llm_query_batched out to (dspy's default: 8)


@dataclass
class Peer:
    name: str
    about: str
    make: Callable[[dict[str, Callable]], Any]  # tools -> a dspy CodeInterpreter
    llm_tools: Callable[[Any], dict[str, Callable]]  # sub_lm -> {"llm_query": ..., "llm_query_batched": ...}
    ours: bool = False


def dspy_llm_tools(sub_lm: Any, max_workers: int = 8) -> dict[str, Callable]:
    """dspy.RLM's own llm_query / llm_query_batched (a ThreadPoolExecutor of `max_workers`, 8 by default)."""
    import dspy

    return dspy.RLM("q -> a", sub_lm=sub_lm, max_llm_calls=1_000_000)._make_llm_tools(max_workers=max_workers)


def ours_daytona() -> tuple[Peer | None, str]:
    """Our DaytonaSandbox through the real SDK against the local fake Daytona API (tests/fakes): the HTTP
    transport's own cost (preview-URL proxying, long polls), without the internet's latency on top."""
    try:
        import daytona  # noqa: F401
        from rlm_pipelines.config import DaytonaOptions, DaytonaSandboxConfig
        from tests.fakes.daytona_server import FakeDaytona
    except ImportError as exc:
        return None, f"needs the Daytona SDK (pip install -e '.[daytona]'): {exc}"
    import atexit

    fake = FakeDaytona().__enter__()
    atexit.register(fake.__exit__, None, None, None)
    os.environ["RLM_BENCH_DAYTONA_KEY"] = fake.api_key
    config = DaytonaSandboxConfig(daytona=DaytonaOptions(api_url=fake.api_url, api_key_env="RLM_BENCH_DAYTONA_KEY"))
    about = "our DaytonaSandbox (real SDK, HTTP transport) against the local fake Daytona API, loopback"
    return _ours("ours (daytona, fake API)", about, config), about


def ours(isolation: str) -> tuple[Peer | None, str]:
    """Our local sandbox through our dspy adapter; (None, why) while it cannot be imported."""
    try:
        from rlm_pipelines.config import LocalSandboxConfig
    except ImportError as exc:
        return None, f"our SandboxInterpreter cannot be imported yet: {exc}"
    about = "our local sandbox, bubblewrap isolation" if isolation == "bwrap" else "our local sandbox, NOT isolated"
    return _ours(f"ours ({isolation})", about, LocalSandboxConfig(isolation=isolation)), about


def _ours(name: str, about: str, config: Any) -> Peer | None:
    try:
        from rlm_pipelines.engines.interpreter import SandboxInterpreter
    except ImportError:
        return None

    def llm_tools(sub_lm: Any) -> dict[str, Callable]:
        try:  # our RLM subclass (a wider fan-out); dspy's wiring at that width until it imports
            from rlm_pipelines.engines.rlm import SandboxRLM

            rlm = SandboxRLM("q -> a", sub_lm=sub_lm, max_llm_calls=1_000_000, sandbox=config,
                             batch_concurrency=OUR_BATCH_CONCURRENCY)
            return rlm._make_llm_tools()
        except ImportError:
            return dspy_llm_tools(sub_lm, max_workers=OUR_BATCH_CONCURRENCY)

    return Peer(name, about, lambda tools: SandboxInterpreter(config, tools=tools), llm_tools, ours=True)


def dspy_local() -> tuple[Peer | None, str]:
    from dspy.primitives.local_interpreter import LocalInterpreter

    about = "dspy LocalInterpreter: a plain subprocess, no isolation"
    return Peer("dspy LocalInterpreter", about, lambda tools: LocalInterpreter(tools=tools), dspy_llm_tools), about


def deno_pyodide() -> tuple[Peer | None, str]:
    """dspy's PythonInterpreter (Deno + Pyodide), or (None, why it cannot start here)."""
    import dspy.primitives.python_interpreter as pi

    deno, import_map, deno_dir = PEERS_DIR / "bin" / "deno", PEERS_DIR / "import_map.json", PEERS_DIR / "deno_dir"
    if not (deno.exists() and import_map.exists() and deno_dir.is_dir()):
        return None, "benchmarks/.peers is not set up: run `bash benchmarks/setup_peers.sh` (needs the npm registry)"
    runner = os.path.realpath(Path(pi.__file__).with_name("runner.js"))
    if "https://deno.land/" in Path(runner).read_text() and "deno.land" not in import_map.read_text():
        return None, "dspy's runner.js imports from deno.land but the import map does not cover it: re-run setup"
    deno_dir = os.path.realpath(deno_dir)
    # As dspy's default command, plus --import-map; dspy reads DENO_DIR from the environment the same way.
    os.environ["DENO_DIR"], os.environ["DENO_NO_PACKAGE_JSON"] = deno_dir, "1"
    command = [str(deno), "run", "--no-config", "--no-lock", "--node-modules-dir=false",
               f"--import-map={import_map}", f"--allow-read={runner},{deno_dir}", runner, "",
               f"--dspy-deno-dir={deno_dir}"]

    def make(tools: dict[str, Callable]) -> Any:
        return pi.PythonInterpreter(deno_command=command, tools=tools)

    probe = make({})
    try:  # fails here, not mid-benchmark, if Deno or Pyodide cannot start (e.g. Pyodide not cached)
        if probe.execute("print(6*7)").strip() != "42":
            return None, "Deno/Pyodide started but printed the wrong answer"
    except Exception as exc:  # noqa: BLE001 - any failure means: skip this peer, say why
        return None, f"Deno/Pyodide could not start: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        probe.shutdown()
    started = time.perf_counter()
    version = subprocess.run([str(deno), "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    probe_ms = (time.perf_counter() - started) * 1000
    note = (f"{version}, npm:pyodide from the npm registry; dspy's runner.js unmodified, its deno.land `readLines` "
            f"import mapped to a local line reader (benchmark-only import map). dspy's default command also runs "
            f"`deno --version` on each start ({probe_ms:.0f} ms here), not in these figures.")
    return Peer("dspy Deno/Pyodide", "dspy PythonInterpreter: Deno + Pyodide (WASM)", make, dspy_llm_tools), note
