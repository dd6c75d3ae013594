"""The pipeline as a Prefect flow (imported only when a run uses Prefect: importing prefect costs ~2 s).

Each step is a task run, so the Prefect UI shows where a run is and what failed; the engine step is retried
on transient infrastructure errors only. Artifacts: a summary table and the links to the run's outputs.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from rlm_pipelines import pipeline


def _transient(task_: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state holds the step's exception
        return pipeline.is_transient_infra(exc)
    return False


def _as_task(retries: int, delay: float) -> pipeline.Step:
    """Each step a task run; only the engine step is retried, and only on transient infrastructure errors."""

    def as_step(name: str, function: Any) -> Any:
        if name != "run engine":
            return task(function, name=name, cache_policy=NONE)
        return task(function, name=name, cache_policy=NONE, retries=retries, retry_delay_seconds=delay,
                    retry_condition_fn=_transient)

    return as_step


def _artifacts(summary: dict[str, Any]) -> None:
    keys = ("status", "partial", "iterations", "agents", "llm_calls", "tokens", "cost_usd", "wall_time_s", "score")
    row = {k: summary.get(k) for k in ("task", "model") + keys}
    row["partial"] = (summary.get("partial") or {}).get("note")  # why the answer may be incomplete
    create_table_artifact(key="rlm-run-summary", table=[row], description=f"rlm-pipelines run {summary['run_id']}"
                          + (" (partial)" if row["partial"] else ""))
    links = "\n".join(f"- [{name}](file://{summary['run_dir']}/{name})" for name in summary["files"])
    comparison = summary.get("comparison")
    if comparison:  # scheduled audits: what changed since the last one
        against = comparison["against"] or "first audit"
        if comparison.get("complete") is False:
            against += " (this audit is partial: findings it did not see are not_compared, not resolved)"
        create_table_artifact(key="rlm-audit-comparison", description=against,
                              table=[{"change": kind, "count": len(comparison[kind]),
                                      "findings": "; ".join(f"{f['file']}: {f['kind']}" for f in comparison[kind][:10])}
                                     for kind in ("new", "still_open", "resolved", "not_compared")
                                     if kind in comparison])
    create_markdown_artifact(key="rlm-run-outputs", description="where this run's outputs are",
                             markdown=f"### Outputs of run {summary['run_id']}\n\n`{summary['run_dir']}`\n\n{links}\n")


def _agent_task_runs(retries: int, delay: float) -> Any:
    """Repo engine: every agent is a task run of its own, so the UI shows the tree of agents; an agent whose
    sandbox could not start is retried, a model's mistake is not."""

    def wrap(run_agent: Any) -> Any:
        return task(run_agent, name="agent", cache_policy=NONE, task_run_name="agent-depth{depth}",
                    retries=retries, retry_delay_seconds=delay, retry_condition_fn=_transient)

    return wrap


@flow(name="rlm-run", flow_run_name="{config[task][name]}-{config[model][name]}", log_prints=True)
def rlm_run(config: dict[str, Any], run_dir: Optional[str] = None) -> dict[str, Any]:
    """One run. `run_dir` is given by the CLI (Hydra's folder); scheduled runs get a fresh one."""
    if run_dir is None:  # a scheduled run: a fresh folder, claimed as the CLI claims its own
        from rlm_pipelines.records import claim_folder

        run_dir = pipeline.default_run_dir(config)
        claim_folder(run_dir)
    run = pipeline.open_run(config, run_dir)
    retries, delay = run.cfg.orchestration.retries, run.cfg.orchestration.retry_delay_s
    run.wrap_agent = _agent_task_runs(retries, delay)
    return pipeline.execute(run, _as_task(retries, delay), on_finish=_artifacts)
