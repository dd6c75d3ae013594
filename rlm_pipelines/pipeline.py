"""The pipeline: prepare inputs -> run the engine -> write outputs -> downstream steps -> summary.

The steps are plain functions over one `Run`; `execute` chains them through an `as_step` wrapper that the
orchestration supplies (`rlm_pipelines.orchestration`: in-process, or each step a Prefect task run). This
module never imports the orchestration: it is what gets orchestrated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from rlm_pipelines import redact
from rlm_pipelines.budget import Budget, BudgetExceeded
from rlm_pipelines.config import RunConfig, check_ranges
from rlm_pipelines.engines.base import Engine, engine_class
from rlm_pipelines.models import Usage, UsageLedger
from rlm_pipelines.models.scripted import serve_task_script
from rlm_pipelines.paths import run_folder
from rlm_pipelines.progress import ConsoleProgress
from rlm_pipelines.records import fit, write_json
from rlm_pipelines.tasks import Task, discover, resolve
from rlm_pipelines.tree import RunTree

# The command's exit code per final status (1 for the rest): `partial` finished but some agents were
# refused or cut; `terminated` ended by SIGTERM; `crashed` is recorded later for a run whose process died.
STATUS_EXIT = {"ok": 0, "partial": 3, "cancelled": 130, "terminated": 143}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: the run ends as on Ctrl-C (every clean-up that Ctrl-C gets runs: sandboxes are
    stopped), and is recorded as `terminated`."""


@dataclass
class Run:
    """What the steps share within one process (never serialized into Prefect)."""

    cfg: RunConfig
    task: Task
    params: Any
    run_dir: Path
    tree: RunTree
    budget: Budget
    progress: ConsoleProgress
    engine: Engine
    inputs: dict[str, Any] = field(default_factory=dict)
    result: Optional[dict[str, Any]] = None
    files: list[str] = field(default_factory=list)
    patch: bytes = b""
    patch_ok: Optional[bool] = None
    wrap_agent: Any = None  # repo engine: how each agent runs (the Prefect flow makes it a task run)
    calls: Any = None  # the call path (models/callstore.py `Calls`): calls.jsonl, replay, resume, cache


def default_run_dir(config: dict[str, Any]) -> str:
    """The folder of a run Hydra does not launch (a scheduled one), named as Hydra names the others."""
    base = Path(config.get("orchestration", {}).get("outputs_dir", "outputs")).expanduser().resolve()
    return str(base / run_folder(config["task"]["name"], config["model"]["name"]))


def _typed(config: dict[str, Any]) -> RunConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), config))  # type: ignore


def open_run(config: dict[str, Any], run_dir: str) -> Run:
    config = redact.take_credentials(config)  # a credential in task.repo is never recorded (see redact.py)
    from rlm_pipelines.models.callstore import build_calls, replay_spec

    cfg = _typed(config)
    if cfg.model.source:  # model=replay: the recorded run's model, so its prompts and keys match
        cfg.model = replay_spec(cfg.model)
    check_ranges(cfg)  # runs that no CLI checked (scheduled, in-process) fail on a bad setting too
    task, params = resolve(OmegaConf.create(config), discover())
    progress = ConsoleProgress(cfg.orchestration.progress)
    ledger = UsageLedger(listener=lambda record: progress.advance() if record.role == "sub" else None)
    engine = engine_class(cfg.engine)(cfg.engine)
    calls = build_calls(cfg, Path(run_dir))  # before the tree: a bad model.source / resume writes nothing
    tree = RunTree(Path(run_dir) / "run.json", {
        "task": task.name, "engine": engine.name, "model": cfg.model.model, "model_name": cfg.model.name,
        "sandbox": asdict(cfg.sandbox), "limits": asdict(cfg.limits), "config": config},
        max_record_mb=cfg.limits.max_record_mb)
    if cfg.model.source:
        tree.run["replayed_from"] = str(Path(cfg.model.source).expanduser().resolve())
    if cfg.resume:
        tree.run["resumed_from"] = str(Path(cfg.resume).expanduser().resolve())
    tree.save()
    cfg.sandbox.labels = {**cfg.sandbox.labels, "rlm-run": tree.run["id"], "rlm-task": task.name}
    return Run(cfg, task, params, Path(run_dir), tree, Budget(cfg.limits, ledger), progress, engine, calls=calls)


# --------------------------------------------------------------------------- steps


def prepare_inputs(run: Run) -> dict[str, Any]:
    return run.engine.prepare(run)


def run_engine(run: Run) -> dict[str, Any]:
    serve_task_script(run.cfg.model.model, run.task.name, lambda: run.task.script(run.params))
    result = run.engine.run(run)
    run.patch, run.patch_ok = result.patch, result.patch_applies
    run.result = run.task.normalize(result.outputs, run.params)
    return run.result


def write_outputs(run: Run) -> list[str]:
    """result.json (fitted under limits.max_record_mb) and the patch; then the run's `partial` reasons are
    known and recorded, so downstream steps (an audit's comparison) can read them from run.json."""
    run.result, cut = fit(run.result, run.cfg.limits.max_record_mb * 1024 * 1024)
    write_json(run.run_dir / "result.json", run.result)
    partial = run.tree.partial_reasons()
    if cut:
        partial["result_cut"] = True
    _record_partial(run, partial)
    files = ["result.json"]
    if run.patch:
        # A patch that does not apply to a fresh checkout is kept for reading, under a name that says so.
        name = "patch.diff" if run.patch_ok else "patch.rejected.diff"
        (run.run_dir / name).write_bytes(run.patch)
        files.append(name)
    run.files.extend(files)
    return files


def downstream(run: Run) -> list[str]:
    files = run.task.downstream(run.result or {}, run.inputs, run.params, run.run_dir, model=run.cfg.model.model)
    run.files.extend(files)
    return files


def summarize(run: Run) -> dict[str, Any]:
    """summary.json: the figures a person compares runs by."""
    tree = run.tree.run
    snapshot = run.budget.ledger.snapshot()
    usage = Usage.from_snapshot(snapshot)
    score = None
    if run.result is not None:
        score = run.task.score(run.result, run.inputs, run.params)
    summary = {
        **run.task.summary(run.result or {}, run.params, run.run_dir), "partial": tree.get("partial"),
        "run_id": tree["id"], "task": tree["task"], "engine": tree["engine"], "model": tree["model"],
        "model_name": tree.get("model_name"), "status": tree["status"], "error": tree["error"],
        "iterations": run.tree.iterations, "agents": run.tree.agents, "max_depth": run.tree.max_depth,
        "patch": {"bytes": len(run.patch), "applies": run.patch_ok} if run.patch else None,
        **usage.as_tree(), "cached_calls": snapshot["cached_calls"], "saved_usd": snapshot["saved_usd"],
        "replayed": bool(run.cfg.model.source), "replayed_calls": snapshot["replayed_calls"],
        "resumed_from": tree.get("resumed_from"), "wall_time_s": tree["duration_s"], "score": score, "run_dir": str(run.run_dir.resolve()),
        "files": ["run.json", "calls.jsonl", *run.files, "summary.json"],
    }
    write_json(run.run_dir / "summary.json", summary)
    return summary


def finish(run: Run, status: str, error: Optional[str] = None) -> dict[str, Any]:
    """Close the run tree, write summary.json and the viewer bundle (also for failed runs)."""
    from rlm_pipelines.viewer import write_bundle

    run.tree.set_usage(Usage.from_snapshot(run.budget.ledger.snapshot()).as_tree())
    run.tree.finish(status, result=run.result, error=error)
    partial = run.tree.run.get("partial") or {}
    if run.tree.record_cut and "record_cut" not in partial:  # the final record itself had to be cut
        _record_partial(run, {**partial, "record_cut": run.tree.record_cut})
        run.tree.finish("partial" if status == "ok" else status, result=run.result, error=error)
    run.files.append("viewer/index.html")
    summary = summarize(run)
    write_bundle(run.run_dir)
    return summary


def _record_partial(run: Run, partial: dict[str, Any]) -> None:
    """run.json's `partial`: the reasons and a `note` saying them in words (console, viewer, Prefect)."""
    partial.pop("note", None)
    run.tree.run["partial"] = {**partial, "note": partial_note(partial)} if partial else None
    run.tree.save()


def partial_note(partial: dict[str, Any]) -> str:
    """Why a run is `partial`, in one line: run.json's `partial.note`, which the console, the viewer, the
    Prefect artifact and the sweep report show."""
    parts = []
    for reason, n in (partial.get("refused") or {}).items():
        parts.append(f"{n:,} sub-agents refused (limits.{reason} reached)")
    if partial.get("truncated"):
        parts.append(f"{partial['truncated']} sub-agent results cut (limits.result_truncation_limit)")
    if partial.get("unfinished"):
        parts.append(f"{partial['unfinished']} sub-agents did not finish")
    if partial.get("result_cut"):
        parts.append("result.json cut to limits.max_record_mb")
    if partial.get("record_cut"):
        parts.append("run.json cut to limits.max_record_mb")
    return "; ".join(parts)


def status_of(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "terminated"
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled"
    if isinstance(exc, BudgetExceeded):
        return exc.status
    return "error"


def is_transient_infra(exc: BaseException) -> bool:
    """Worth another attempt of the engine step: the sandbox could not start, or the provider was down after
    our per-call retries. Never the model's own mistakes, nor a sandbox set up so it can never work."""
    from rlm_pipelines.sandbox import SandboxConfigError, SandboxStartError

    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if any(isinstance(e, (SandboxConfigError, BudgetExceeded)) for e in chain):  # another try cannot help
        return False
    return any(isinstance(e, SandboxStartError) or getattr(e, "transient", False) for e in chain)


# --------------------------------------------------------------------------- chaining


STEPS: tuple[tuple[str, Callable[[Run], Any]], ...] = (
    ("prepare inputs", prepare_inputs), ("run engine", run_engine),
    ("write outputs", write_outputs), ("downstream steps", downstream))

Step = Callable[[str, Callable[[Run], Any]], Callable[[Run], Any]]


def execute(run: Run, as_step: Step,
            on_finish: Callable[[dict[str, Any]], None] = lambda summary: None) -> dict[str, Any]:
    """Run the steps in order, each through `as_step(name, function)` (as it is, or as a Prefect task run).
    Whatever happens, run.json, summary.json and the viewer are written; a spent budget is a result, any other
    failure is raised after that."""
    try:
        for name, function in STEPS:
            as_step(name, function)(run)
    except BaseException as exc:
        summary = finish(run, status_of(exc), f"{type(exc).__name__}: {exc}")
        on_finish(summary)
        if isinstance(exc, BudgetExceeded):
            return summary
        raise
    summary = finish(run, "partial" if run.tree.run.get("partial") else "ok")
    on_finish(summary)
    return summary
