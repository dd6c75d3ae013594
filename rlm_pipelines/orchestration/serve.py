"""`python -m rlm_pipelines.serve [--config-dir DIR] schedule=nightly [schedule.KEY=...] [run overrides]`:
serve scheduled runs.

Serves one Prefect deployment per repo of `conf/schedule/<name>.yaml`, each on its cron schedule, until
stopped. Schedules only fire against a Prefect server (`prefect server start` + PREFECT_API_URL). Each
deployment carries its fully composed run config as plain data; runs write under
`orchestration.outputs_dir` (made absolute here, so it does not depend on where the worker runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rlm_pipelines.checks import UsageError, check_run
from rlm_pipelines.environment import apply_defaults
from rlm_pipelines.paths import conf_dir


def deployments_config(argv: list[str]) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    """(the schedule, [(deployment name, run config)]) from the command line; fails before serving on bad
    input."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlm_pipelines.config import register_configs
    from rlm_pipelines.tasks import discover, register_task_schemas

    argv, dirs = _config_dirs(argv)
    names = [a.split("=", 1)[1] for a in argv if a.startswith("schedule=")]
    if len(names) != 1:
        raise UsageError("name one schedule, e.g. schedule=nightly (a file in conf/schedule/ or in a folder "
                         "given with --config-dir)")
    home = next((d for d in [*dirs, conf_dir()] if (d / "schedule" / f"{names[0]}.yaml").is_file()), None)
    if home is None:
        raise UsageError(f"no schedule {names[0]!r}: there is no schedule/{names[0]}.yaml in "
                         + ", ".join(str(d) for d in [*dirs, conf_dir()]))
    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]"] if dirs else []
    run_overrides = [*search, *(a for a in argv if not a.startswith("schedule"))]
    register_configs()
    register_task_schemas(discover(), conf_dir())
    with initialize_config_dir(config_dir=str(home), version_base="1.3"):
        schedule = compose(f"schedule/{names[0]}", overrides=[a for a in argv if a.startswith("schedule.")]).schedule
    plans = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for repo in schedule.repos:
            where = str(Path(repo.repo).resolve()) if Path(repo.repo).exists() else repo.repo
            overrides = [f"task={repo.task}", f"task.repo={where}", f"task.branch={repo.branch}",
                         f"model={schedule.model_name}", *repo.get("overrides", []), *run_overrides]
            cfg = compose("config", overrides=overrides)
            cfg.orchestration.outputs_dir = str(Path(cfg.orchestration.outputs_dir).expanduser().resolve())
            check_run(cfg, offline_hint="or choose schedule.model_name=scripted to run offline")
            plans.append((f"{repo.task}-{repo.name}", OmegaConf.to_container(cfg, resolve=True)))
    return schedule, plans


def _config_dirs(argv: list[str]) -> tuple[list[str], list[Path]]:
    """`--config-dir DIR` / `-cd DIR` (as the run command takes them): the user's config folders, which come
    before the built-in ones; returns (the other arguments, the folders)."""
    rest, dirs, args = [], [], iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd"):
            value = next(args, None)
            if value is None:
                raise UsageError(f"{arg} needs a folder")
            dirs.append(value)
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    for folder in dirs:
        if not Path(folder).is_dir():
            raise UsageError(f"--config-dir {folder}: no such folder")
    return rest, [Path(folder).resolve() for folder in dirs]


def main(argv: list[str] | None = None) -> None:
    apply_defaults()
    argv = sys.argv[1:] if argv is None else argv
    try:
        schedule, plans = deployments_config(argv)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None
    from prefect import serve
    from prefect.schedules import Cron

    from rlm_pipelines.orchestration.prefect_flow import rlm_run

    deployments = [rlm_run.to_deployment(name=name, parameters={"config": config},
                                         schedule=Cron(schedule.cron, timezone=schedule.timezone),
                                         tags=["rlm-pipelines", config["task"]["name"]])
                   for name, config in plans]
    print(f"serving {len(deployments)} deployments on '{schedule.cron}' ({schedule.timezone}): "
          + ", ".join(name for name, _ in plans), flush=True)
    serve(*deployments)


if __name__ == "__main__":
    main()
