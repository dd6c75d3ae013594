"""Task plugins: what a run works on.

A task carries its parameters (a dataclass: the schema of `task.*`), the engine it runs on by default, a
scripted policy for `model=scripted`, optional downstream steps (plots) and an optional score. What the
engine needs of it is in the engine's own task type: `DocumentTask` (inputs, a dspy signature and
instructions) or `RepoTask` (the root agent's prompt, the result parsed from its answer). Built-in tasks
live in `tasks/<name>/` (installed as `rlm_tasks.<name>`); any installed package adds tasks through the
entry-point group `rlm_pipelines.tasks`, each entry pointing at a `Task` instance.

Lifecycle of a task in a run:
    1. discovered (`discover()`), its `params` schema stored in Hydra's ConfigStore as `task_schema_<name>`,
       which `conf/task/<name>.yaml` extends (a third-party task without a yaml there gets `task/<name>`
       made for it, so `task=<name>` works and picks its engine)
    2. `check(params)`: fail fast on bad input (a missing file), before any sandbox starts
    3. the engine prepares the inputs and runs; `normalize` cleans its outputs for result.json
    4. `downstream(result, inputs, params, run_dir)` writes plots; `score(...)` grades; `summary(...)` adds
       task-specific entries to summary.json
"""

from __future__ import annotations

import dataclasses
import json
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

GROUP = "rlm_pipelines.tasks"


@dataclasses.dataclass
class TaskParams:
    """What every task's parameters have; tasks extend it with their own."""

    name: str = ""  # the task's name (set by its yaml)


class Task:
    """Base class of task plugins; subclass `DocumentTask` or `RepoTask` and override what the task needs."""

    name: str = ""
    engine: str = ""  # the engine it runs on unless `engine=...` says otherwise (conf/engine/<engine>.yaml)
    params: type = TaskParams  # a dataclass extending TaskParams: the schema of `task.*` in the config

    def check(self, params: Any) -> None:
        """Raise ValueError/FileNotFoundError with a message that says what to do."""

    def input_sizes(self, params: Any) -> list[tuple[str, int]]:
        """What the task's input is made of, each part as (the setting that makes it, its size in bytes), e.g.
        [("task.source '/books/x.txt'", 2_700_000)] (see `file_sizes`): their sum is bounded by
        `limits.max_input_mb` before anything starts."""
        return []

    def script(self, params: Any) -> Any:
        """The scripted policy (a `rlm_pipelines.models.scripted.Script`) for `model=scripted`."""
        raise NotImplementedError(f"task {self.name!r} has no scripted policy")

    def normalize(self, result: dict[str, Any], params: Any) -> dict[str, Any]:
        """The engine's outputs cleaned for result.json (e.g. name variants folded)."""
        return result

    def downstream(self, result: dict[str, Any], inputs: dict[str, Any], params: Any, run_dir: Path,
                   model: str = "") -> list[str]:
        """Steps after the engine (plots); returns the files written, relative to run_dir. `model` names the
        model that produced the result, for captions."""
        return []

    def score(self, result: dict[str, Any], inputs: dict[str, Any], params: Any) -> Optional[float]:
        return None

    def summary(self, result: dict[str, Any], params: Any, run_dir: Path) -> dict[str, Any]:
        """Task-specific entries for summary.json (and the Prefect summary), e.g. a comparison with the last
        run."""
        return {}


class DocumentTask(Task):
    """A task over inputs the host builds (documents, chapters) and a dspy signature: the document engine
    hands the inputs to dspy.RLM and returns the signature's outputs."""

    engine = "document"
    signature: str = ""  # e.g. "documents: list[str] -> answer: str"
    instructions: str = ""  # for the signature (kept in a prompt file)

    def build_inputs(self, params: Any) -> dict[str, Any]:
        raise NotImplementedError


def file_sizes(key: str, paths: list[Path]) -> list[tuple[str, int]]:
    """`Task.input_sizes` of input files named by the setting `key` (e.g. task.source)."""
    return [(f"{key} {str(path)!r}", path.stat().st_size if path.is_file() else 0) for path in paths]


def check_input_size(task: Task, params: Any, max_input_mb: float) -> None:
    """Raise ValueError when the task's input together exceeds `limits.max_input_mb`: the host holds the
    inputs in memory (more than one copy while it splits and sends them), so an unbounded input would take
    the host down instead of failing."""
    sizes = task.input_sizes(params)
    total = sum(size for _, size in sizes)
    if total > max_input_mb * 2**20:
        what, size = max(sizes, key=lambda item: item[1])
        raise ValueError(f"the task's input is {total / 2**20:.0f} MB (largest: {what}, {size / 2**20:.0f} MB), "
                         f"over limits.max_input_mb={max_input_mb:g}: give a smaller input, or raise "
                         f"limits.max_input_mb (limits=large allows 1024)")


def discover() -> dict[str, Task]:
    """Every installed task, by name."""
    tasks: dict[str, Task] = {}
    for entry in entry_points(group=GROUP):
        task = entry.load()
        if not isinstance(task, Task):
            raise TypeError(f"entry point {entry.name!r} ({entry.value}) must point at a rlm_pipelines.tasks.Task")
        tasks[task.name or entry.name] = task
    return tasks


def register_task_schemas(tasks: dict[str, Task], builtin_conf: Path) -> None:
    """Each task's schema as `task_schema_<name>` (which its yaml extends; kept out of --help), and for a
    task without a yaml in `builtin_conf/task/`, a `task/<name>` option made as that yaml would be."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, task in tasks.items():
        if not dataclasses.is_dataclass(task.params):
            continue
        store.store(name=f"task_schema_{name}", node=task.params)
        if not (builtin_conf / "task" / f"{name}.yaml").is_file():
            defaults: list[Any] = [f"/task_schema_{name}@_here_"]
            if task.engine:
                defaults.append({"override /engine@_global_.engine": task.engine})
            store.store(group="task", name=name, node={"defaults": [*defaults, "_self_"], "name": name})


def resolve(cfg: DictConfig, tasks: Optional[dict[str, Task]] = None) -> tuple[Task, Any]:
    """The task plugin a composed config names, and its params as a typed object."""
    tasks = tasks if tasks is not None else discover()
    name = cfg.task.get("name")
    if name not in tasks:
        known = ", ".join(sorted(tasks)) or "none installed"
        raise ValueError(f"unknown task {name!r}; installed tasks: {known}")
    task = tasks[name]
    params = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(task.params), cfg.task))
    return task, params


@dataclasses.dataclass
class RepoParams(TaskParams):
    """What every repo-engine task takes; tasks extend it."""

    repo: str = ""  # a git URL or the path of a local git repository
    branch: Optional[str] = None  # null = the default branch
    commit: Optional[str] = None  # null = the branch's head; else every agent checks out this commit
    prompt: str = ""  # what the root agent is asked to do (tasks have a default)
    patch_out: Optional[str] = None  # also copy the patch here (besides the run folder's patch.diff)


class RepoTask(Task):
    """A task for recursive agents on a git checkout: the root agent gets `prompt(params)`; its FINAL answer,
    parsed by `parse_result` (JSON for a dict, else a report), is the result."""

    engine = "repo"
    params: type = RepoParams

    def check(self, params: RepoParams) -> None:
        check_repo(params.repo)

    def prompt(self, params: RepoParams) -> str:
        return params.prompt

    def parse_result(self, text: str, params: RepoParams) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            return {"report": text}
        return value if isinstance(value, dict) else {"report": value}


URL = re.compile(r"^(https?|ssh|git|file)://[^\s/]*(/\S*)?$")
SCP = re.compile(r"^[\w.-]+@[\w.-]+:\S+$")  # git's scp-like syntax: git@github.com:owner/repo.git


def check_repo(repo: str) -> None:
    """Raise ValueError/FileNotFoundError unless `task.repo` is a well-formed git URL or a local git repository:
    a bad one fails before any sandbox starts, and a value git would read as an option never reaches it."""
    if not repo:
        raise ValueError("task.repo is empty: give a git URL or a local repository path, e.g. task.repo=.")
    if repo.startswith("-"):
        raise ValueError(f"task.repo={repo!r} starts with '-': give a git URL or a local repository path")
    if "://" in repo:
        if not URL.match(repo) or (not repo.startswith("file:") and not _hostname(repo)):
            raise ValueError(f"task.repo={repo!r} is not a valid git URL: use https://host/owner/repo.git, "
                             f"ssh://host/path, git@host:owner/repo.git or a local path")
        return
    if SCP.match(repo):
        return
    path = Path(repo).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"task.repo={repo!r} is not a folder on this machine nor a git URL: give the "
                                f"path of a local git repository or a URL (https://..., git@host:...)")
    if not ((path / ".git").exists() or (path / "HEAD").is_file()):
        raise ValueError(f"task.repo={repo!r} is a folder but not a git repository (no .git): run `git init` "
                         f"there and commit, or give the repository's own folder")


def _hostname(url: str) -> Optional[str]:
    try:
        return urlsplit(url).hostname
    except ValueError:  # e.g. a malformed port or IPv6 address
        return None
