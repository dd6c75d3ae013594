"""A dspy 3.4.1 `CodeInterpreter` over one of our sandboxes and its REPL session.

Lifecycle (dspy's protocol):
    1. `SandboxInterpreterFactory(config)()` creates an interpreter: config only, no resources
    2. `start()`: sandbox + REPL server (idempotent; `execute` calls it lazily)
    3. `execute(code, variables)`: many times, state kept; RLM mutates `tools` / `output_fields` between runs
    4. `shutdown()`: the sandbox and every process in it are gone (idempotent)

Why not dspy's own interpreters: `PythonInterpreter` (Deno + Pyodide) takes seconds to start and copies
every input into WASM on every iteration; `LocalInterpreter` is not a sandbox (host files, env, network).
Inputs here cross once (`set_vars`); dspy passes them on every `execute`, so unchanged ones are skipped.

Errors: the model's own mistakes (syntax, exceptions, a cell timeout, a rejected SUBMIT, even a killed REPL,
which restarts) are `SyntaxError` / `CodeExecutionError` and go back to the model; `CodeInterpreterError`
only when the sandbox cannot run code at all; `BudgetExceeded` (timeout) when the run's deadline cut the cell.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any, Callable, Optional

from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError, FinalOutput

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.engines import prompts
from rlm_pipelines.repl.session import ReplError, ReplSession
from rlm_pipelines.sandbox import SandboxConfigError, SandboxError, SandboxStartError, describe, make_sandbox
from rlm_pipelines.sandbox.base import Sandbox

_IMMUTABLE = (str, bytes, int, float, bool, type(None), tuple, frozenset)


class SandboxInterpreter:
    def __init__(self, config: Optional[SandboxConfig] = None, tools: Optional[dict[str, Callable]] = None,
                 output_fields: Optional[list[dict[str, Any]]] = None,
                 on_start: Optional[Callable[[str], None]] = None, deadline: Optional[float] = None):
        self.config = config or SandboxConfig()
        self.on_start = on_start  # told the sandbox id once it runs (the run tree records it)
        self.deadline = deadline  # the run's end (time.monotonic()): a cell still running then is cut
        self.tools: dict[str, Callable[..., Any]] = dict(tools or {})
        self.output_fields = output_fields
        self._tools_registered = False  # dspy's RLM resets this when it injects fresh tools
        self._registered: Optional[tuple] = None
        self._sent: dict[str, tuple[Any, Any]] = {}  # name -> (object sent, snapshot) to skip resending
        self.sandbox: Optional[Sandbox] = None
        self.session: Optional[ReplSession] = None
        self._lock = threading.Lock()
        self._ended = False

    # -- lifecycle

    def start(self) -> None:
        with self._lock:
            if self._ended:
                raise CodeInterpreterError("this interpreter was shut down; create a new one")
            if self.session is not None:
                return
            try:
                self.sandbox = make_sandbox(self.config, name="dspy")
                self.sandbox.start()
                self.session = self.sandbox.open_repl()
                if self.on_start is not None:
                    self.on_start(self.sandbox.id)
            except (SandboxError, ReplError, OSError) as exc:
                self._stop_sandbox()
                error = CodeInterpreterError(f"cannot start the sandbox: {exc}")
                if isinstance(exc, SandboxConfigError):  # set up so it can never start: not retried
                    raise error from exc
                # A sandbox that cannot start is an infrastructure failure: the pipeline may retry its step.
                raise error from SandboxStartError(str(exc))

    def shutdown(self) -> None:
        with self._lock:
            self._ended = True
            self._stop_sandbox()

    def _stop_sandbox(self) -> None:
        sandbox, self.sandbox, self.session = self.sandbox, None, None
        if sandbox is not None:
            sandbox.stop()

    def __enter__(self) -> "SandboxInterpreter":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __call__(self, code: str, variables: Optional[dict[str, Any]] = None) -> Any:
        return self.execute(code, variables)

    # -- execution

    def execute(self, code: str, variables: Optional[dict[str, Any]] = None) -> Any:
        if not isinstance(code, str):
            raise CodeInterpreterError("code must be a string")
        self.start()
        session = self.session
        assert session is not None
        try:
            self._register(session)
            self._send_vars(session, variables or {})
        except (ValueError, TypeError) as exc:
            raise CodeInterpreterError(str(exc)) from exc
        except ReplError as exc:
            raise CodeInterpreterError(f"the sandbox REPL failed: {exc}") from exc
        if not code.strip():
            return prompts.load("no_code").format(detail="the code was empty")
        try:
            result = session.execute(code, deadline=self.deadline)
        except ReplError as exc:
            raise CodeInterpreterError(f"the sandbox REPL cannot run code: {exc}") from exc
        if result.final is not None:
            return FinalOutput(result.final["value"])
        self._check_deadline()
        if result.error is not None:
            if result.error.type == "SyntaxError":
                raise SyntaxError(result.output())
            raise CodeExecutionError(result.output())
        if result.value is not None and not result.notice:  # as dspy's interpreters: the value, else the prints
            return result.data
        return result.output() or None

    def _check_deadline(self) -> None:
        """After a cell: at the run's deadline the run ends (the cell was cut there), whatever the cell said."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise BudgetExceeded("wall time limit reached (limits.wall_time_s): the running cell was cut at the "
                                 "run's deadline", status="timeout")

    def _register(self, session: ReplSession) -> None:
        fields = [f["name"] for f in self.output_fields] if self.output_fields is not None else None
        key = (tuple((name, id(fn)) for name, fn in sorted(self.tools.items())), tuple(fields or ()))
        if self._tools_registered and key == self._registered:
            return
        session.register(self.tools, submit_fields=fields)
        self._registered, self._tools_registered = key, True

    def _send_vars(self, session: ReplSession, variables: dict[str, Any]) -> None:
        """Send only variables that are new or changed since they were last sent."""
        changed = {}
        for name, value in variables.items():
            if name in self.tools:
                raise ValueError(f"variable {name!r} has the name of a host function")
            sent = self._sent.get(name)
            if sent is not None and sent[0] is value and (isinstance(value, _IMMUTABLE) or value == sent[1]):
                continue
            changed[name] = value
        if not changed:
            return
        try:  # set_vars serializes them (once: a large input is not copied again to check it first)
            session.set_vars(changed)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"inputs must be JSON-compatible to enter the sandbox: {exc}") from exc
        for name, value in changed.items():
            self._sent[name] = (value, value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value))


class SandboxInterpreterFactory:
    """What `dspy.RLM(interpreter_factory=...)` takes: a zero-argument callable, plus the
    `execution_instructions` RLM puts into the model's prompt, describing this sandbox truthfully."""

    def __init__(self, config: Optional[SandboxConfig] = None, on_start: Optional[Callable[[str], None]] = None,
                 deadline: Optional[float] = None):
        self.config = config or SandboxConfig()
        self.on_start = on_start
        self.deadline = deadline

    def __call__(self) -> SandboxInterpreter:
        return SandboxInterpreter(self.config, on_start=self.on_start, deadline=self.deadline)

    @property
    def execution_instructions(self) -> str:
        cfg = self.config
        return prompts.load("sandbox_instructions").format(
            **describe(cfg),  # python, isolation, workdir: as the backend offers them
            network="The network is reachable." if cfg.network else "There is no network access.",
            tools="llm_query, llm_query_batched and any listed tools",
            timeout=f"{cfg.repl.cell_timeout_s:g}",
            output_limit=cfg.repl.output_limit_chars,
        )
