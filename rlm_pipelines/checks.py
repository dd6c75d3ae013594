"""Input checks that run before anything starts: the CLI and `serve` both call `check_run`, so whatever can
be wrong with a composed config (an unknown task, a missing input file, a missing key, an impossible sandbox
setting) fails at once with a message that says what to do, and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UsageError(Exception):
    """Bad input: printed without a traceback, exit code 2."""


def check_early_final(policy: str) -> None:
    from rlm_pipelines.engines.replies import EARLY_FINAL_POLICIES

    if policy not in EARLY_FINAL_POLICIES:
        raise ValueError(f"model.early_final={policy!r} is not a policy: use one of {', '.join(EARLY_FINAL_POLICIES)}")


def check_run(cfg: Any, offline_hint: str = "or choose model=scripted to run offline") -> None:
    """Raise UsageError for a composed run config that cannot work. `offline_hint` is how this command says
    'use the scripted model' (serve's override differs)."""
    from omegaconf import OmegaConf

    from rlm_pipelines.config import check_ranges
    from rlm_pipelines.engines.base import engine_class
    from rlm_pipelines.models import MissingKeyError, check_key
    from rlm_pipelines.sandbox import check_sandbox, typed_config
    from rlm_pipelines.tasks import check_input_size, resolve

    try:
        for section in ("model", "limits", "orchestration"):
            check_ranges(OmegaConf.to_object(cfg[section]), f"{section}.")
        check_ranges(typed_config(OmegaConf.to_object(cfg.sandbox)), "sandbox.")
        task, params = resolve(cfg)
        engine = engine_class(cfg.engine)
        if not isinstance(task, engine.task_type):
            raise ValueError(f"engine={cfg.engine.name} runs {engine.task_type.__name__}s and task={task.name} is "
                             f"not one; leave engine= out to use the task's own (engine={task.engine})")
        task.check(params)
        check_input_size(task, params, cfg.limits.max_input_mb)
        check_sandbox(OmegaConf.to_object(cfg.sandbox))
        check_early_final(cfg.model.early_final)
        check_recorded(cfg.model.model, cfg.model.source, cfg.get("resume"))
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    try:
        check_key(OmegaConf.to_object(cfg.model))
    except MissingKeyError as exc:
        raise UsageError(f"{exc}, {offline_hint}") from None


def check_recorded(model: str, source: Any, resume: Any) -> None:
    """`model=replay` has a `model.source`; it and `resume` name run folders with recorded calls."""
    from rlm_pipelines.models.callstore import RecordedCalls, recorded_model

    if model.startswith("replay/") and not source:
        raise ValueError("model=replay replays a recorded run: name it with model.source=<run dir> (a folder "
                         "under outputs/runs/ holding run.json and calls.jsonl)")
    for folder in (source, resume):
        if folder:
            RecordedCalls(Path(folder).expanduser())
            recorded_model(folder)
