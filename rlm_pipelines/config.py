"""Structured-config schemas: one dataclass per swappable part.

They are plain dataclasses so they work three ways: built directly in code and tests, composed by Hydra
from `conf/` (registered in the ConfigStore, so a wrong type or an unknown key fails at compose time), and
passed across into Prefect as plain data (`dataclasses.asdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import MISSING

from rlm_pipelines.sandbox.base import WORKSPACE


@dataclass
class ReplConfig:
    """How the host drives one in-sandbox REPL server."""

    # Per-cell wall-clock limit; at the limit the cell gets KeyboardInterrupt (namespace kept).
    cell_timeout_s: float = 120.0
    # Absolute per-cell limit: waiting on host functions (llm_query, rlm_query, tools) extends a cell's
    # `cell_timeout_s`, never this; at it the cell is interrupted like at its timeout.
    cell_ceiling_s: float = 1800.0
    # After the interrupt, how long a cell may take to stop before the REPL process is killed (state lost).
    kill_grace_s: float = 2.0
    # Captured stdout and stderr are each cut to this many characters (head and tail kept, a marker says
    # how much was cut). The cap is applied inside the sandbox, so a print loop cannot flood the host.
    output_limit_chars: int = 100_000
    # Host threads answering calls from sandbox code (llm_query, rlm_query, tools) concurrently.
    host_workers: int = 64
    # Seconds the server may take to start and say hello.
    start_timeout_s: float = 30.0
    # Largest protocol message (one frame: a host call's arguments, a cell's result) in megabytes, on both
    # sides of the channel; an oversize call gets an error in the cell, an oversize frame ends the REPL.
    max_message_mb: int = 8


@dataclass
class DaytonaOptions:
    """Daytona cloud sandboxes (`sandbox=daytona`). Every sandbox carries labels (run id, task) so the
    clean-up command finds orphans; each is deleted when its agent ends, and `ephemeral` / `ttl_minutes`
    make Daytona delete it anyway if this process dies first."""

    api_key_env: str = "DAYTONA_API_KEY"  # the NAME of the variable holding the key (never the key)
    api_url: Optional[str] = None  # null: $DAYTONA_API_URL, else Daytona's cloud
    target: Optional[str] = None  # region, e.g. us or eu; null: the organisation's default
    snapshot: Optional[str] = None  # a snapshot with Python 3 and git; null: Daytona's default one
    image: Optional[str] = None  # build from this image instead (then cpu / memory_gb / disk_gb apply)
    cpu: Optional[int] = None
    memory_gb: Optional[int] = None
    disk_gb: Optional[int] = None
    auto_stop_minutes: int = 15  # idle sandboxes stop (and, ephemeral, are deleted)
    ephemeral: bool = True  # deleted as soon as they stop
    auto_delete_minutes: Optional[int] = None  # when not ephemeral: delete this long after stopping
    ttl_minutes: Optional[int] = 240  # hard lifetime, whatever happens to this process
    network_allow_list: Optional[str] = None  # CIDRs sandbox code may reach when `network` is false
    # How repo agents get their checkout: `clone` (Daytona's git.clone; with the network off it is opened
    # for the clone, which needs Daytona tier 3+), `upload` (a git bundle of the host's mirror: no network,
    # private repos and local paths work), `auto` (clone where it can work, else upload).
    checkout: str = "auto"
    workdir: str = WORKSPACE  # made at start; the engines' paths (REPO_DIR) assume it
    python: str = "python3"  # the sandbox's Python (runs the REPL server; stdlib only)
    repl_port: int = 7801  # first port for REPL servers (a restarted server takes the next one)
    create_timeout_s: float = 180.0
    gateway_retry_s: float = 60.0  # how long a request is retried through 502/503/504 and resets


@dataclass
class SandboxConfig:
    """Where model-written code runs: what every backend shares. `kind` picks the backend (see
    `rlm_pipelines.sandbox.BACKENDS`), whose own schema adds its settings: `LocalSandboxConfig`,
    `DaytonaSandboxConfig`. A plain `SandboxConfig` gets that backend's defaults for the rest."""

    kind: str = "local"
    # Network inside the sandbox. Off by default: model-written code is hostile until proven otherwise.
    network: bool = False
    # The sandbox starts with an empty environment plus these values (never the host's API keys) ...
    env: dict[str, str] = field(default_factory=dict)
    # ... plus these host variables copied by name, only when a task really needs them.
    pass_env: list[str] = field(default_factory=list)
    # Host folder for the run's temporary folders (local sandbox roots, the repo engine's base checkout and
    # bundle); null = the system temp dir.
    root_dir: Optional[str] = None
    repl: ReplConfig = field(default_factory=ReplConfig)
    # Put on every sandbox of the run (the pipeline adds rlm-run and rlm-task), so `python -m
    # rlm_pipelines.sandbox cleanup` can find them.
    labels: dict[str, str] = field(default_factory=dict)
    # Repo engine: sub-agents' sandboxes are forks of one prepared sandbox (the repo cloned once) instead
    # of fresh sandboxes that each clone it. Only where the backend can fork (daytona); local sub-agents'
    # checkouts are hardlinked copies already.
    fork_subagents: bool = False


@dataclass
class LocalSandboxConfig(SandboxConfig):
    """`sandbox=local`: bubblewrap on this machine, with rlimits on every process."""

    kind: str = "local"
    # `bwrap` (required), `none` (plain subprocess, NOT isolated), `auto` (bwrap, else `none` with a loud
    # warning).
    isolation: str = "auto"
    memory_mb: int = 2048  # memory of all the sandbox's processes together (and each one's address space)
    cpu_seconds: int = 3600  # CPU time per process
    disk_mb: int = 4096  # bytes in the workspace and /tmp together (the files written last go when over)
    file_size_mb: int = 1024  # largest file a process may write (at most disk_mb)
    max_processes: int = 256  # processes and threads of the whole sandbox (contains fork bombs)
    watch_interval_s: float = 0.1  # how often the host sums memory, processes and disk against the limits
    # Python inside the sandbox; null = the host interpreter (its install is bound read-only).
    python: Optional[str] = None


@dataclass
class DaytonaSandboxConfig(SandboxConfig):
    """`sandbox=daytona`: Daytona cloud sandboxes; the provider's settings are under `daytona`."""

    kind: str = "daytona"
    daytona: DaytonaOptions = field(default_factory=DaytonaOptions)


@dataclass
class SubModelSpec:
    """The model `llm_query` talks to, as overrides of the main model: unset (null) fields are inherited."""

    model: Optional[str] = None
    api_key_env: Optional[str] = None
    api_base: Optional[str] = None
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    timeout_s: Optional[float] = None
    num_retries: Optional[int] = None
    retry_base_s: Optional[float] = None
    input_cost_per_mtok: Optional[float] = None
    output_cost_per_mtok: Optional[float] = None
    stop: Optional[list[str]] = None  # [] sends the sub-model no stop sequences
    reasoning_effort: Optional[str] = None  # "" sends the sub-model none


@dataclass
class ModelSpec:
    """One language model, as litellm names it. Keys are never stored: only the NAME of the env var."""

    name: str = "scripted"  # the config's name, used in output paths
    model: str = "scripted/default"
    api_key_env: Optional[str] = None
    api_base: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 4096
    timeout_s: float = 120.0
    num_retries: int = 3  # of transient errors (429, 5xx, timeouts, dropped connections), per call
    retry_base_s: float = 1.0  # backoff before retry n is about retry_base_s * 2**n (with jitter, capped)
    # Prices for models litellm's bundled map lacks, in dollars per million tokens.
    input_cost_per_mtok: Optional[float] = None
    output_cost_per_mtok: Optional[float] = None
    # Per-model quirks, fixed by config (README, "Model replies"). Appended to the system prompt:
    extra_instructions: str = ""
    stop: list[str] = field(default_factory=list)  # stop sequences sent with every call
    reasoning_effort: Optional[str] = None  # low | medium | high, for reasoning models that take it
    # false: the model takes no system role; the system prompt is put at the head of the first user message
    system_prompt: bool = True
    # A FINAL written before the model saw its code's output: `confirm` (run the code, ask again) or `accept`.
    early_final: str = "confirm"
    # Model for llm_query / llm_query_batched: fields that differ from this model (all null = the same model).
    sub: SubModelSpec = field(default_factory=SubModelSpec)
    # Record and replay (rlm_pipelines/models/callstore.py): `source`, a run folder whose calls.jsonl answers
    # every call (`model=replay`); a call it lacks stops the run, or with on_miss=live goes to the live model.
    source: Optional[str] = None
    on_miss: str = "stop"  # stop | live
    # The disk cache of calls shared by runs: true, false, or null (on when temperature is 0).
    cache: Optional[bool] = None


@dataclass
class LimitsConfig:
    """Bounds on one run. Every limit is enforced, and reaching it is recorded in the run tree."""

    max_iterations: int = 20  # model turns per agent
    max_llm_calls: int = 300  # llm_query calls per run (a batch reserves all of its prompts at once)
    max_depth: int = 2  # recursion depth of sub-agents (repo engine)
    max_sandboxes: int = 50  # sandboxes created over the run's lifetime (repo engine)
    max_tokens: int = 5_000_000  # prompt + completion tokens over the whole run
    max_cost_usd: float = 5.0  # dollars over the whole run
    wall_time_s: float = 3600.0  # the whole run
    max_output_chars: int = 10_000  # a cell's output as shown to the model (head + tail kept)
    concurrency: int = 32  # parallel llm_query_batched calls (and sub-agents)
    result_truncation_limit: int = 8000  # characters of a sub-agent's findings its parent sees
    history_chars: int = 60_000  # characters of past turns in an agent's prompt (older turns dropped)
    max_input_mb: int = 256  # a task's input files together (task.source, ...): larger fails up front
    max_patch_mb: int = 20  # a repo agent's patch: a larger one is dropped and the run tree says so
    max_record_mb: int = 20  # run.json (and the viewer's copy): texts are clipped to keep it under this


@dataclass
class OrchestrationConfig:
    """How the run is driven. Prefect is the default; `prefect: false` runs the same steps in-process."""

    prefect: bool = True
    retries: int = 2  # of the engine step, on transient infrastructure errors only
    retry_delay_s: float = 5.0
    progress: bool = True  # per-iteration lines and progress bars on the console
    outputs_dir: str = "outputs"  # where run folders go (runs/..., sweeps/...), for every way a run starts


@dataclass
class EngineConfig:
    """Which engine runs the task (`conf/engine/<name>.yaml`): `_target_` is the Engine class, built with
    this config. Engines with options of their own extend it."""

    _target_: str = MISSING
    name: str = MISSING


@dataclass
class RunConfig:
    """The composed configuration of one run (`conf/config.yaml`)."""

    task: Any = MISSING  # validated against the task plugin's own schema (see rlm_pipelines/tasks.py)
    engine: EngineConfig = field(default_factory=EngineConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    sandbox: Any = MISSING  # validated against its backend's schema (sandbox_schema_<kind>, see conf/sandbox)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    # A run folder (cancelled, failed, budget-stopped): its recorded calls answer first, at no cost.
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        # A config read back from plain data (run.json, Prefect) has the sandbox as a dict: type it again.
        if self.sandbox is not MISSING:
            from rlm_pipelines.sandbox import typed_config

            self.sandbox = typed_config(self.sandbox)


# --------------------------------------------------------------------------- allowed ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: `low` (excluded when `above`) up to `high` (included)."""

    low: float
    high: Optional[float] = None
    above: bool = False  # strictly above `low` (e.g. a timeout: > 0)

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if value < self.low or (self.above and value == self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low = f"{'>' if self.above else '>='} {self.low:g}"
        return low if self.high is None else f"{low} and <= {self.high:g}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, above=True)
_MODEL_RANGES = {"temperature": Range(0, 2), "max_tokens": AT_LEAST_1, "timeout_s": ABOVE_0,
                 "num_retries": Range(0, 20), "retry_base_s": AT_LEAST_0, "input_cost_per_mtok": AT_LEAST_0,
                 "output_cost_per_mtok": AT_LEAST_0}

# Every numeric setting (its key in the run config) -> the values it may take. A value outside fails before
# anything starts (`check_ranges`, called by `checks.check_run` and `pipeline.open_run`): 0 or a negative
# number never silently means "unlimited" or "nothing". tests/test_checks.py keeps every numeric field here.
RANGES: dict[str, Range] = {
    **{f"model.{key}": value for key, value in _MODEL_RANGES.items()},
    **{f"model.sub.{key}": value for key, value in _MODEL_RANGES.items()},
    "limits.max_iterations": AT_LEAST_1, "limits.max_llm_calls": AT_LEAST_1, "limits.max_depth": AT_LEAST_0,
    "limits.max_sandboxes": AT_LEAST_1, "limits.max_tokens": AT_LEAST_1, "limits.max_cost_usd": ABOVE_0,
    "limits.wall_time_s": ABOVE_0, "limits.max_output_chars": AT_LEAST_1, "limits.concurrency": AT_LEAST_1,
    "limits.result_truncation_limit": AT_LEAST_1, "limits.history_chars": AT_LEAST_1,
    "limits.max_input_mb": ABOVE_0, "limits.max_patch_mb": ABOVE_0, "limits.max_record_mb": ABOVE_0,
    "orchestration.retries": Range(0, 20), "orchestration.retry_delay_s": AT_LEAST_0,
    "sandbox.repl.cell_timeout_s": ABOVE_0, "sandbox.repl.cell_ceiling_s": ABOVE_0,
    "sandbox.repl.kill_grace_s": AT_LEAST_0,
    "sandbox.repl.output_limit_chars": AT_LEAST_1, "sandbox.repl.host_workers": AT_LEAST_1,
    "sandbox.repl.start_timeout_s": ABOVE_0, "sandbox.repl.max_message_mb": AT_LEAST_1,
    # local: the REPL server itself needs about 64 MB and a few threads to start
    "sandbox.memory_mb": Range(128), "sandbox.cpu_seconds": AT_LEAST_1, "sandbox.disk_mb": AT_LEAST_1,
    "sandbox.file_size_mb": AT_LEAST_1, "sandbox.max_processes": Range(8), "sandbox.watch_interval_s": Range(0.01, 10),
    "sandbox.daytona.cpu": AT_LEAST_1, "sandbox.daytona.memory_gb": AT_LEAST_1, "sandbox.daytona.disk_gb": AT_LEAST_1,
    "sandbox.daytona.auto_stop_minutes": AT_LEAST_0, "sandbox.daytona.auto_delete_minutes": AT_LEAST_0,
    "sandbox.daytona.ttl_minutes": AT_LEAST_1, "sandbox.daytona.repl_port": Range(1, 65535),
    "sandbox.daytona.create_timeout_s": ABOVE_0, "sandbox.daytona.gateway_retry_s": AT_LEAST_0,
}


def check_ranges(config: Any, prefix: str = "") -> None:
    """Raise ValueError naming the first numeric setting of `config` (a config dataclass, e.g. a RunConfig
    or its `limits` with prefix "limits.") outside its range in RANGES. Unset (null) values are not checked."""
    for item in fields(config):
        value, key = getattr(config, item.name), f"{prefix}{item.name}"
        if is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        allowed = RANGES.get(key)
        if allowed is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not allowed.allows(value):
            raise ValueError(f"{key}={value!r} is out of range: it must be {allowed}")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, so a wrong type or an unknown key fails at compose time, and
    the resolvers `conf/config.yaml` uses."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from rlm_pipelines.paths import hydra_run_folder, process_run_id

    from rlm_pipelines.sandbox import BACKENDS, backend

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for kind in BACKENDS:  # conf/sandbox/<kind>.yaml extends its schema (kept out of --help)
        store.store(name=f"sandbox_schema_{kind}", node=backend(kind).config_class)
    OmegaConf.register_new_resolver("rlm_run_folder", hydra_run_folder, replace=True)
    OmegaConf.register_new_resolver("rlm_run_id", process_run_id, replace=True)
    OmegaConf.register_new_resolver("rlm_models", model_list, replace=True)


def model_list() -> str:
    """The built-in model configs, one line each with the first line of its comment (for --help)."""
    from rlm_pipelines.paths import conf_dir

    lines = []
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        about = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"  {path.stem:<22}{about}")
    return "\n".join(lines)
