"""The interpreters we measure against, each as a zero-argument factory of a dspy CodeInterpreter.

dspy's default `PythonInterpreter` (Deno + Pyodide) imports a line reader from deno.land, which machines
without internet cannot reach. `DenoPyodide` runs it on a BENCHMARK-ONLY temporary copy of dspy's
runner.js whose only change is a local line reader; everything else (Deno, Pyodide from the npm registry,
dspy's protocol) is dspy's own. The benchmark says so in its output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

LOCAL_READLINES = '''
async function* readLines(reader) {  // benchmark-only stand-in for deno.land/std io/readLines
  const decoder = new TextDecoder();
  let buffer = "";
  const chunk = new Uint8Array(65536);
  while (true) {
    const n = await reader.read(chunk);
    if (n === null) { if (buffer) yield buffer; return; }
    buffer += decoder.decode(chunk.subarray(0, n), { stream: true });
    let at;
    while ((at = buffer.indexOf("\\n")) >= 0) {
      yield buffer.slice(0, at).replace(/\\r$/, "");
      buffer = buffer.slice(at + 1);
    }
  }
}
'''


def ours(isolation: str) -> Callable[[], Any]:
    from rlm_pipelines.config import SandboxConfig
    from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory

    return SandboxInterpreterFactory(SandboxConfig(isolation=isolation))


def dspy_local() -> Callable[[], Any]:
    from dspy.primitives.local_interpreter import LocalInterpreter

    return LocalInterpreter


def deno_pyodide() -> tuple[Optional[Callable[[], Any]], str]:
    """(factory, note) or (None, why it cannot run here)."""
    try:
        from deno import find_deno_bin
    except ImportError:
        return None, "the `deno` package is missing (pip install deno, or run benchmarks/setup_peers.sh)"
    from dspy.primitives import python_interpreter
    from dspy.primitives.python_interpreter import PythonInterpreter

    original = Path(python_interpreter.__file__).with_name("runner.js")
    source = original.read_text()
    pattern = r'^import \{ readLines \} from "https://deno\.land/[^"]+";$'
    patched, count = re.subn(pattern, lambda _: LOCAL_READLINES, source, flags=re.MULTILINE)
    if count != 1:
        return None, "dspy's runner.js changed: the deno.land import to replace was not found"
    folder = Path(tempfile.mkdtemp(prefix="bench-deno-runner-"))
    runner = folder / "runner.js"
    runner.write_text(patched)

    class DenoPyodide(PythonInterpreter):
        def _get_runner_path(self) -> str:
            return str(runner)

    # Pyodide comes from the npm registry into Deno's cache on first use: warm it once, outside the timings.
    probe = DenoPyodide()
    try:
        assert probe.execute("print(1)").strip() == "1"
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        return None, f"Deno/Pyodide could not start: {exc}"
    finally:
        probe.shutdown()
    version = subprocess.run([find_deno_bin(), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return DenoPyodide, f"{version}; dspy's runner.js with a local readLines (benchmark-only copy)"
