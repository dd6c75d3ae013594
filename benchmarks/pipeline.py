"""The pipeline as a user meets it: CLI start to the first model call, and peak host memory of the
Monte Cristo run.

    python benchmarks/pipeline.py [--book PATH] [--rounds N]

Start-up is measured three ways, side by side: in-process steps (`orchestration.prefect=false`), Prefect
against a running `prefect server start` (PREFECT_API_URL set), and Prefect with no server (it starts a
temporary one in the process). The model is `model=local` pointed at an OpenAI-compatible server on
127.0.0.1 that answers with the task's scripted replies, so "first model call" is a real HTTP request.
Memory: the CLI process's peak RSS (VmHWM) over a whole scripted Monte Cristo run (target <= 400 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rlm_pipelines.models import scripted  # noqa: E402
from rlm_tasks.monte_cristo import task as monte_cristo  # noqa: E402
from tests.fakes.openai_server import OpenAIServer  # noqa: E402

BOOK = ROOT.parent / "shared" / "data" / "monte_cristo" / "1184-0.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("prefect server did not start")


def peak_rss_mb(pid: int, stop: threading.Event, out: list[float]) -> None:
    peak = 0
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            break
        time.sleep(0.05)
    out.append(peak / 1024)


def run_cli(args: list[str], env: dict[str, str], cwd: str, server: OpenAIServer) -> dict[str, float]:
    """Seconds from process start to the first model request, total seconds, and peak RSS in MB."""
    server.requests.clear()
    first: list[float] = []
    reply = server.reply
    server.reply = lambda request: (first.append(time.perf_counter()) if not first else None, reply(request))[1]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    watcher = threading.Thread(target=peak_rss_mb, args=(process.pid, stop, peak))
    watcher.start()
    _, stderr = process.communicate()
    total = time.perf_counter() - started
    stop.set()
    watcher.join()
    server.reply = reply
    if process.returncode != 0:
        raise RuntimeError(f"run failed: {stderr[-2000:]}")
    return {"first_call_s": first[0] - started, "total_s": total, "peak_rss_mb": peak[0] if peak else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book", default=str(BOOK))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    scripted.register_script("bench", monte_cristo.script(monte_cristo.params()))
    server = OpenAIServer(reply=lambda request: scripted.reply(
        "scripted/bench.sub" if request["model"] == "bench-sub" else "scripted/bench", request["messages"])).start()
    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    base = ["task=monte_cristo", "model=local", f"model.api_base={server.url}", "model.model=openai/bench-root",
            "model.sub.model=openai/bench-sub", f"task.source={args.book}", "orchestration.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    prefect_home = Path(work) / "prefect-home"
    prefect, url = start_prefect_server(prefect_home)
    modes = {
        "in-process steps (orchestration.prefect=false)": (base + ["orchestration.prefect=false"], env),
        "Prefect, running server (PREFECT_API_URL)": (base, {**env, "PREFECT_API_URL": url,
                                                               "PREFECT_HOME": str(prefect_home)}),
        "Prefect, no server (temporary one per run)": (base, {**env, "PREFECT_HOME": str(Path(work) / "eph")}),
    }
    results = {}
    try:
        for name, (cli_args, cli_env) in modes.items():
            runs = [run_cli(cli_args, cli_env, work, server) for _ in range(args.rounds)]
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name:48} first model call {results[name]['first_call_s']:6.2f} s   whole run "
                  f"{results[name]['total_s']:6.2f} s   peak RSS {results[name]['peak_rss_mb']:6.0f} MB", flush=True)
    finally:
        os.killpg(prefect.pid, 9)
        server.stop()
    fastest = min(r["first_call_s"] for r in results.values())
    print("\nratio of each mode's start-up to the fastest:")
    for name, r in results.items():
        print(f"  {name:48} {r['first_call_s'] / fastest:5.1f}x")
    peak = max(r["peak_rss_mb"] for r in results.values())
    print(f"\npeak host memory of the Monte Cristo run (CLI process): {peak:.0f} MB (target <= 400 MB)")
    out = ROOT / "benchmarks" / "results" / "pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"results": results, "rounds": args.rounds, "cpus": os.cpu_count(),
                               "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
