"""Orchestration: what drives the pipeline's steps. The only folder that imports Prefect.

    in-process  (`orchestration.prefect: false`)  `inprocess.py`: the steps in order, the engine step retried
                                                  on transient infrastructure errors
    Prefect     (default)                         `prefect_flow.py`: the `rlm-run` flow, each step a task
                                                  run, each repo agent a task run, artifacts
    scheduled   (`python -m rlm_pipelines.serve`) `serve.py`: one deployment per repo on a cron schedule

The pipeline (`rlm_pipelines.pipeline`) knows nothing of these: each passes it an `as_step` wrapper.
"""

from __future__ import annotations

from typing import Any


def run_pipeline(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One run of a composed config (plain data) into `run_dir`, the way its `orchestration` section says.
    `records.FolderTaken` if `run_dir` already holds a run."""
    from rlm_pipelines.records import claim_folder

    claim_folder(run_dir)  # refuses a folder that holds another run's run.json
    if config.get("orchestration", {}).get("prefect", True):
        from rlm_pipelines.orchestration.prefect_flow import rlm_run

        return rlm_run(config=config, run_dir=run_dir)
    from rlm_pipelines.orchestration.inprocess import run_steps

    return run_steps(config, run_dir)
