"""The Engine protocol: what runs a task's agents. One file per engine in this folder, one config per
engine in `conf/engine/` (its `_target_` names the class), so a new engine is one file plus one yaml.

Lifecycle of an engine in a run:
    1. `engine_class(cfg.engine)`: the class the config names; `task_type` says which tasks it runs, so a
       mismatch fails before anything starts (`checks.check_run`)
    2. constructed with its config: `Engine(config)`
    3. `prepare(run)`: the task's inputs into `run.inputs` (the pipeline's "prepare inputs" step)
    4. `run(run) -> EngineResult`: the agents run (the "run engine" step; retried on transient
       infrastructure errors only, so it must not leave anything behind when it raises)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable


@dataclass
class EngineResult:
    """What an engine hands back: the task's raw outputs (the task normalizes them) and, for engines that
    change a repository, the patch and whether it applies to a fresh checkout."""

    outputs: dict[str, Any]
    patch: bytes = b""
    patch_applies: Optional[bool] = None


@runtime_checkable
class Engine(Protocol):
    name: str
    task_type: type  # the Task subclass it runs (DocumentTask, RepoTask)

    # `run` is the pipeline's Run (task, params, cfg, tree, budget, progress, inputs); engines read it and
    # never import the pipeline, which is what drives them.
    def prepare(self, run: Any) -> dict[str, Any]:
        """Build the task's inputs into `run.inputs`; returns a small description for the step's record."""
        ...

    def run(self, run: Any) -> EngineResult: ...


def engine_class(config: Any) -> type:
    """The engine class a `conf/engine/*.yaml` names in `_target_`, with a clear error when it cannot be
    imported or is not an engine."""
    from hydra.utils import get_class

    target = _get(config, "_target_")
    try:
        cls = get_class(target)
    except Exception as exc:
        raise ValueError(f"engine {_get(config, 'name')!r}: cannot import its _target_ {target!r} ({exc})") from None
    if not (hasattr(cls, "prepare") and hasattr(cls, "run") and isinstance(getattr(cls, "task_type", None), type)):
        raise ValueError(f"engine _target_ {target!r} is not an Engine (needs task_type, prepare and run)")
    return cls


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)
