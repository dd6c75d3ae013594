"""The pipeline's steps in this process, without Prefect (`orchestration.prefect: false`): the same steps,
and the same retry rule for the engine step that the Prefect flow gets from task retries."""

from __future__ import annotations

import time
from typing import Any, Callable

from rlm_pipelines.pipeline import Run, execute, is_transient_infra, open_run


def _with_retries(name: str, function: Callable[[Run], Any]) -> Callable[[Run], Any]:
    if name != "run engine":
        return function

    def engine_step(run: Run) -> Any:
        attempts = run.cfg.orchestration.retries + 1
        for attempt in range(attempts):
            try:
                return function(run)
            except Exception as exc:
                if attempt + 1 >= attempts or not is_transient_infra(exc):
                    raise
                run.progress.line(f"transient failure ({exc}); retrying the engine step")
                time.sleep(run.cfg.orchestration.retry_delay_s)

    return engine_step


def run_steps(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """All steps in-process, without Prefect."""
    return execute(open_run(config, run_dir), _with_retries)
