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
Bad names (a tool called `class`, an output field without a name) and `execute` called again while a cell
runs (from a host tool, say: waiting would deadlock) are `CodeInterpreterError` at once. Inputs are converted
as dspy converts them (`repl/convert.py`); one with no JSON form is a `CodeExecutionError`, told once.
"""

from __future__ import annotations

import copy
import functools
import inspect
import keyword
import threading
import time
from typing import Any, Callable, Optional

from dspy.primitives.code_interpreter import CodeExecutionError, CodeInterpreterError, FinalOutput
from dspy.utils.callback import BaseCallback, with_callbacks

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.engines import prompts
from rlm_pipelines.repl.convert import Unconvertible, jsonable
from rlm_pipelines.repl.session import ReplError, ReplSession, run_awaitable
from rlm_pipelines.sandbox import SandboxConfigError, SandboxError, SandboxStartError, describe, make_sandbox
from rlm_pipelines.sandbox.base import Sandbox

_IMMUTABLE = (str, bytes, int, float, bool, type(None), tuple, frozenset)
_NOTHING = object()
RESERVED = frozenset({"SUBMIT", "FINAL", "FINAL_VAR", "__builtins__", "__name__"})  # the REPL's own names


class InvalidNames(CodeInterpreterError, ValueError):
    """Names sandbox code could not use. Both kinds dspy's LocalInterpreter raises for them (ValueError for
    tools and output fields, CodeInterpreterError for variables), so either `except` catches it."""


class SandboxInterpreter:
    def __init__(self, config: Optional[SandboxConfig] = None, tools: Optional[dict[str, Callable]] = None,
                 output_fields: Optional[list[dict[str, Any]]] = None,
                 on_start: Optional[Callable[[str], None]] = None, deadline: Optional[float] = None,
                 callbacks: Optional[list[BaseCallback]] = None):
        self.config = config or SandboxConfig()
        self.callbacks = list(callbacks or [])  # dspy's interpreter callbacks, besides those in dspy.settings
        self.on_start = on_start  # told the sandbox id once it runs (the run tree records it)
        self.deadline = deadline  # the run's end (time.monotonic()): a cell still running then is cut
        self.tools: dict[str, Callable[..., Any]] = dict(tools or {})
        self.output_fields = output_fields
        self._tools_registered = False  # dspy's RLM resets this when it injects fresh tools
        self._registered: Optional[tuple] = None
        self._sent: dict[str, tuple[Any, Any]] = {}  # name -> (object sent, snapshot) to skip resending
        self.sandbox: Optional[Sandbox] = None
        self.session: Optional[ReplSession] = None
        self._refused: dict[str, Any] = {}  # name -> the input that could not cross (told once)
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while code runs: a second execute() meanwhile is refused
        self._ended = False
        check_names(self.tools, output_fields, {})

    # -- lifecycle

    @with_callbacks
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

    @with_callbacks
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

    @with_callbacks
    def execute(self, code: str, variables: Optional[dict[str, Any]] = None) -> Any:
        if not self._busy.acquire(blocking=False):  # waiting would deadlock a tool calling back (point 3)
            raise CodeInterpreterError(
                "this interpreter is already running code: execute() was called again (from a host tool, or "
                "another thread) before the running cell ended. Use a separate interpreter for nested code.")
        try:
            return self._execute(code, variables)
        finally:
            self._busy.release()

    def _execute(self, code: str, variables: Optional[dict[str, Any]]) -> Any:
        if not isinstance(code, str):
            raise CodeInterpreterError("code must be a string")
        variables = variables or {}
        check_names(self.tools, self.output_fields, variables)
        if self.session is None:
            self.start()
        session = self.session
        assert session is not None
        try:
            self._register(session)
            refused = self._send_vars(session, variables)
        except (ValueError, TypeError) as exc:
            raise CodeInterpreterError(str(exc)) from exc
        except ReplError as exc:
            raise CodeInterpreterError(f"the sandbox REPL failed: {exc}") from exc
        if refused:  # recoverable: the model is told once, and the next cell runs without that input
            raise CodeExecutionError(f"{refused}. It was not sent into the sandbox, and this cell was not run: "
                                     f"run it again without that input.")
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
        session.register({name: self._host_tool(name, fn) for name, fn in self.tools.items()}, submit_fields=fields)
        self._registered, self._tools_registered = key, True

    def _host_tool(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """What the session calls for a tool: `invoke_tool`, so dspy's interpreter callbacks see every call;
        it keeps the tool's signature and doc for the sandbox-side stub."""
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.invoke_tool(name, list(args), kwargs)

        return functools.update_wrapper(call, function)

    @with_callbacks
    def invoke_tool(self, tool_name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run one host tool for sandbox code (on a host-call thread, in the cell's context); an async tool
        is awaited here, so callbacks see its value."""
        function = self.tools.get(tool_name)
        if function is None:
            raise CodeInterpreterError(f"unknown tool: {tool_name}")
        result = function(*args, **kwargs)
        return run_awaitable(result) if inspect.isawaitable(result) else result

    def _send_vars(self, session: ReplSession, variables: dict[str, Any]) -> str:
        """Send only variables that are new or changed since they were last sent, converted as dspy converts
        them. Returns why an input cannot cross ("" when all can); one refused is not offered again."""
        changed, refused = {}, []
        for name, value in variables.items():
            sent = self._sent.get(name)
            if sent is not None and sent[0] is value and (isinstance(value, _IMMUTABLE) or value == sent[1]):
                continue
            if self._refused.get(name, _NOTHING) is value:
                continue
            try:
                changed[name] = jsonable(value, f"input {name!r}")
            except Unconvertible as exc:
                self._refused[name] = value
                self._sent.pop(name, None)
                refused.append(str(exc))
        if changed:  # set_vars serializes them (once: a large input is not copied again to check it first)
            session.set_vars(changed)
            for name in changed:
                value = variables[name]
                self._sent[name] = (value, value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value))
        return "; ".join(refused)


def check_names(tools: dict[str, Any], output_fields: Optional[list[dict[str, Any]]],
                variables: dict[str, Any]) -> None:
    """Refuse, before anything runs, names sandbox code could not use (as dspy's LocalInterpreter does):
    `class` or `a-b` as a tool could never be called, nor a `SUBMIT` field with such a name be passed."""
    def bad(names: Any, reserved: frozenset = RESERVED) -> list:
        return [n for n in names if not isinstance(n, str) or not n.isidentifier() or keyword.iskeyword(n)
                or n in reserved]

    if bad(tools):
        raise InvalidNames(f"tool names must be Python identifiers that are not keywords or reserved "
                           f"({', '.join(sorted(RESERVED))}); invalid: {bad(tools)!r}")
    if output_fields is not None:
        nameless = [f for f in output_fields if not isinstance(f, dict) or "name" not in f]
        if nameless:
            raise InvalidNames(f"every output field needs a 'name' (a dict like {{'name': 'answer', "
                               f"'type': 'str'}}); without one: {nameless!r}")
        names = [f["name"] for f in output_fields]
        wrong = bad(names, frozenset())
        if wrong:
            raise InvalidNames(f"output field names must be Python identifiers that are not keywords "
                               f"(SUBMIT takes them as keyword arguments); invalid: {wrong!r}")
        if len(set(names)) != len(names):
            raise InvalidNames(f"output field names must be unique; got {names!r}")
    invalid = bad(variables) + [n for n in variables if n in tools]
    if invalid:
        raise InvalidNames(f"variable names must be Python identifiers that are not keywords, reserved "
                           f"or the name of a tool; invalid: {invalid!r}")


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
