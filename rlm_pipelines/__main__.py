"""`python -m rlm_pipelines ...`: Hydra composes and validates a run, then the pipeline runs it.

Everything that can be wrong with the input (an unknown task or model, a wrong type, a missing key, a
missing input file) fails here, before any sandbox starts, with a message that says what to do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import rlm_pipelines  # noqa: F401 - sets LITELLM_LOCAL_MODEL_COST_MAP before anything imports litellm

CONF = Path(__file__).resolve().parent.parent / "conf"

# Prefect without a server starts a temporary one in this process: give it time on small machines, and
# keep it from phoning home. A user's own settings win.
for key, value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(key, value)


class UsageError(Exception):
    """Bad input: printed without a traceback, exit code 2."""


def _check(cfg) -> None:
    from omegaconf import OmegaConf

    from rlm_pipelines.models import MissingKeyError, check_key
    from rlm_pipelines.sandbox import check_sandbox
    from rlm_pipelines.tasks import resolve

    try:
        task, params = resolve(cfg)
        task.check(params)
        check_key(OmegaConf.to_object(cfg.model))
        check_sandbox(OmegaConf.to_object(cfg.sandbox))
    except (ValueError, FileNotFoundError, MissingKeyError) as exc:
        raise UsageError(str(exc)) from None


def _quiet_libraries() -> None:
    """Hydra sets the root logger to INFO; these libraries would flood the console with per-call lines."""
    import logging

    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):  # its WARNINGs are about price-map details
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("httpx", "httpcore", "matplotlib", "dspy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _app(cfg) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlm_pipelines.flows import STATUS_EXIT, run_pipeline

    _quiet_libraries()
    _check(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    config = OmegaConf.to_container(cfg, resolve=True)
    print(f"run: task={cfg.task.name} model={cfg.model.name} -> {run_dir}", file=sys.stderr)
    try:
        summary = run_pipeline(config, run_dir)
    except KeyboardInterrupt:
        print(f"cancelled: run.json in {run_dir} records everything up to now", file=sys.stderr)
        return 130
    except Exception as exc:  # recorded in run.json and summary.json; a sweep goes on with its next job
        print(f"error: {type(exc).__name__}: {exc}\n(run.json and summary.json in {run_dir})", file=sys.stderr)
        return 1
    print(f"{summary['status']}: {summary['iterations']} iterations, {summary['llm_calls']} llm calls, "
          f"{summary['tokens']:,} tokens, ${summary['cost_usd']:.4f}, {summary['wall_time_s']:.1f} s -> "
          f"{run_dir}", file=sys.stderr)
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    return STATUS_EXIT.get(summary["status"], 1)


def main() -> None:
    import hydra

    from rlm_pipelines.config import register_configs
    from rlm_pipelines.tasks import discover, register_task_schemas

    register_configs()
    register_task_schemas(discover(), CONF)
    codes: list[int] = []

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def app(cfg) -> None:
        try:
            codes.append(_app(cfg))
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            codes.append(2)

    app()
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
