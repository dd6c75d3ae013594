"""Where things are: the package's own files (found the same way in a checkout, an editable install and a
wheel), the user's cache, and how run folders are named."""

from __future__ import annotations

import os
import time
from importlib.resources import files
from pathlib import Path


def conf_dir() -> Path:
    """The built-in Hydra config groups (top-level `conf/`, installed as `rlm_pipelines.conf`)."""
    return Path(str(files("rlm_pipelines.conf")))


def cache_dir(*parts: str) -> Path:
    """`$RLM_CACHE_DIR`, else `~/.cache/rlm-pipelines`, joined with `parts`: downloads and repo mirrors that
    runs share."""
    base = os.environ.get("RLM_CACHE_DIR") or Path.home() / ".cache" / "rlm-pipelines"
    return Path(base, *parts)


def run_folder(task: str, model: str, when: float | None = None) -> str:
    """`runs/<task>/<date>/<time>_<model>`: the name of a run's folder under the outputs folder, for runs
    Hydra launches (`hydra.run.dir` uses it through the `rlm_run_folder` resolver) and for runs it does not
    (scheduled ones) alike."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(when))
    return f"runs/{task}/{stamp}_{model}"
