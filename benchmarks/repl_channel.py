"""REPL start time and cell round-trip in a local sandbox (issue 11, point 1: the broker/worker split adds a
process and a hop; this shows what that costs).

    python benchmarks/repl_channel.py [--isolation bwrap|none] [--starts 5] [--cells 200]

Prints the median and worst time to open a REPL (server up and hello received), the median round-trip of an
empty cell, and of a cell making one host call.
"""

from __future__ import annotations

import argparse
import statistics
import time

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.sandbox.local import LocalSandbox


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.1f} ms, worst {max(values) * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolation", default="bwrap", choices=["bwrap", "none"])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--cells", type=int, default=200)
    args = parser.parse_args()
    with LocalSandbox(LocalSandboxConfig(isolation=args.isolation)) as box:
        starts = []
        for _ in range(args.starts):
            began = time.perf_counter()
            session = box.open_repl()
            starts.append(time.perf_counter() - began)
            session.close()
        session = box.open_repl()
        session.register({"echo": lambda x: x})
        session.execute("1")
        empty, called = [], []
        for times, code in ((empty, "1"), (called, "echo(1)")):
            for _ in range(args.cells):
                began = time.perf_counter()
                assert session.execute(code).ok
                times.append(time.perf_counter() - began)
        session.close()
    print(f"isolation={args.isolation}")
    print(f"REPL start:            {_ms(starts)}  ({args.starts} starts)")
    print(f"empty cell round-trip: {_ms(empty)}  ({args.cells} cells)")
    print(f"cell with a host call: {_ms(called)}  ({args.cells} cells)")


if __name__ == "__main__":
    main()
