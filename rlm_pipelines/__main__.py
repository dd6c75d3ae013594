"""`python -m rlm_pipelines ...`: Hydra composes and validates a run, then the orchestration runs it.

Everything that can be wrong with the input fails in `checks.check_run`, before any sandbox starts. The
config groups are the package's own (`rlm_pipelines.paths.conf_dir()`), plus any folder given with Hydra's
`--config-dir` (a user's own models, tasks, limits).
"""

from __future__ import annotations

import sys
import time

from rlm_pipelines import redact
from rlm_pipelines.checks import UsageError, check_run
from rlm_pipelines.environment import apply_defaults


def _quiet_libraries() -> None:
    """Hydra sets the root logger to INFO; these libraries would flood the console with per-call lines."""
    import logging

    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):  # its WARNINGs are about price-map details
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("httpx", "httpcore", "matplotlib", "dspy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _say(text: str) -> None:
    from rlm_pipelines.text import safe_text

    print(redact.text(safe_text(text)), file=sys.stderr)


def _keep_credentials_out(cfg, run_dir: str) -> None:
    """A credential in task.repo goes no further than this process: the config loses it (the repo's fetch
    gets it from `redact`) and Hydra's copies of the command line and config are rewritten without it."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    redact.take_credentials(cfg)
    hydra = HydraConfig.get()
    files = [*(Path(run_dir) / ".hydra").glob("*.yaml")]
    if hydra.mode == RunMode.MULTIRUN:  # the sweep folder's multirun.yaml lists every job's overrides
        files.append(Path(hydra.sweep.dir) / "multirun.yaml")
    for path in files:
        redact.redact_file(path)


def _app(cfg) -> int:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlm_pipelines.orchestration import run_pipeline
    from rlm_pipelines.pipeline import STATUS_EXIT, Terminated
    from rlm_pipelines.records import FolderTaken, disk_full, mark_crashed

    _quiet_libraries()
    run_dir = HydraConfig.get().runtime.output_dir
    _keep_credentials_out(cfg, run_dir)
    check_run(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    for folder in mark_crashed(Path(cfg.orchestration.outputs_dir)):
        _say(f"note: the run in {folder} was still `running` but its process is gone: recorded as crashed")
    _say(f"run: task={cfg.task.name} model={cfg.model.name} -> {run_dir}")
    try:
        summary = run_pipeline(config, run_dir)
    except FolderTaken as exc:
        _say(f"error: {exc}")
        return 2
    except Terminated as exc:
        _say(f"terminated ({exc}): run.json in {run_dir} records everything up to now")
        return 143
    except KeyboardInterrupt:
        _say(f"cancelled: run.json in {run_dir} records everything up to now")
        return 130
    except Exception as exc:  # recorded in run.json and summary.json; a sweep goes on with its next job
        full = disk_full(exc)
        if full is not None:  # run.json keeps its last good version; nothing more can be written
            _say(f"error: {full}")
            return 1
        _say(f"error: {type(exc).__name__}: {exc}\n(run.json and summary.json in {run_dir})")
        return 1
    _say(f"{summary['status']}: {_figures(summary)} -> {run_dir}")
    if summary.get("error"):
        _say(f"error: {summary['error']}")
    if summary.get("partial"):
        _say(f"partial: {summary['partial'].get('note')} (run.json says which)")
    return STATUS_EXIT.get(summary["status"], 1)


def _figures(summary: dict) -> str:
    """The final line's figures: the work, the cost, the score of a scored task, and the time the user
    waited in all (start-up included) beside the run's own part."""
    from rlm_pipelines.records import process_started_at

    score = summary.get("score")
    scored = "" if score is None else f"score {score:.2f}, " if isinstance(score, (int, float)) else f"score {score}, "
    total = time.time() - process_started_at()
    return (f"{summary['iterations']} iterations, {summary['llm_calls']} llm calls, {summary['tokens']:,} tokens, "
            f"${summary['cost_usd']:.4f}, {scored}{total:.1f} s in all (the run {summary['wall_time_s']:.1f} s)")


def main() -> None:
    apply_defaults()
    redact.remember_arguments(sys.argv[1:])  # before Hydra logs or stores them
    redact.install_log_redaction()
    import hydra

    from rlm_pipelines.config import register_configs
    from rlm_pipelines.paths import conf_dir
    from rlm_pipelines.tasks import discover, register_task_schemas

    register_configs()
    register_task_schemas(discover(), conf_dir())
    codes: list[int] = []

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def app(cfg) -> None:
        try:
            codes.append(_app(cfg))
        except UsageError as exc:
            print(redact.text(f"error: {exc}"), file=sys.stderr)
            codes.append(2)
        except KeyboardInterrupt as exc:  # before the run started: nothing to record
            from rlm_pipelines.pipeline import Terminated

            terminated = isinstance(exc, Terminated)
            print(f"{'terminated' if terminated else 'cancelled'} before the run started", file=sys.stderr)
            codes.append(143 if terminated else 130)

    app()
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
