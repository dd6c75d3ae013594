"""Where things are: the package's own files (found the same way in a checkout, an editable install and a
wheel), the user's cache, and how run folders are named."""

from __future__ import annotations

import os
import time
import uuid
from functools import lru_cache
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


def new_run_id() -> str:
    """A short random id that makes a run's folder its own (two runs started in the same second)."""
    return uuid.uuid4().hex[:6]


@lru_cache(maxsize=None)
def process_run_id() -> str:
    """One id per process: what Hydra's `hydra.run.dir` and `hydra.sweep.dir` get (through the
    `rlm_run_id` resolver), the same however often Hydra resolves them."""
    return new_run_id()


def run_folder(task: str, model: str, when: float | None = None, run_id: str | None = None) -> str:
    """`runs/<task>/<date>/<time>_<id>_<model>`: the name of a run's folder under the outputs folder, for runs
    Hydra launches (`hydra.run.dir` uses it through the `rlm_run_folder` resolver, with this process's id) and
    for runs it does not (scheduled ones, a fresh id each) alike. The id keeps runs started in the same
    second apart."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(when))
    return f"runs/{task}/{stamp}_{run_id or new_run_id()}_{model}"


def hydra_run_folder(task: str, model: str) -> str:
    """`run_folder` for the `rlm_run_folder` resolver: this process's id, so every resolution agrees."""
    return run_folder(task, model, run_id=process_run_id())
