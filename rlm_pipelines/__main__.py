"""`python -m rlm_pipelines ...`: Hydra composes and validates a run, then the orchestration runs it.

Everything that can be wrong with the input fails in `checks.check_run`, before any sandbox starts. The
config groups are the package's own (`rlm_pipelines.paths.conf_dir()`), plus any folder given with Hydra's
`--config-dir` (a user's own models, tasks, limits).
"""

from __future__ import annotations

import sys

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
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlm_pipelines.orchestration import run_pipeline
    from rlm_pipelines.pipeline import STATUS_EXIT

    _quiet_libraries()
    run_dir = HydraConfig.get().runtime.output_dir
    _keep_credentials_out(cfg, run_dir)
    check_run(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    print(f"run: task={cfg.task.name} model={cfg.model.name} -> {run_dir}", file=sys.stderr)
    try:
        summary = run_pipeline(config, run_dir)
    except KeyboardInterrupt:
        print(f"cancelled: run.json in {run_dir} records everything up to now", file=sys.stderr)
        return 130
    except Exception as exc:  # recorded in run.json and summary.json; a sweep goes on with its next job
        print(redact.text(f"error: {type(exc).__name__}: {exc}\n(run.json and summary.json in {run_dir})"),
              file=sys.stderr)
        return 1
    print(f"{summary['status']}: {summary['iterations']} iterations, {summary['llm_calls']} llm calls, "
          f"{summary['tokens']:,} tokens, ${summary['cost_usd']:.4f}, {summary['wall_time_s']:.1f} s -> "
          f"{run_dir}", file=sys.stderr)
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    return STATUS_EXIT.get(summary["status"], 1)


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
        except KeyboardInterrupt:  # before the run started: nothing to record
            print("cancelled before the run started", file=sys.stderr)
            codes.append(130)

    app()
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
