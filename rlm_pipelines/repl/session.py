"""Host side of one in-sandbox REPL server.

Lifecycle of a `ReplSession`:
    1. created by `Sandbox.open_repl()`: the server process is started and has said hello
    2. `register(tools, submit_fields, final)` and `set_vars(inputs)`: once per run, not per turn
    3. `execute(code)`: many times; state persists across cells
    4. `close()`: idempotent; the server process is gone afterwards

Calls from sandbox code (`llm_query`, `rlm_query`, tools) are multiplexed by call id and answered from a
bounded thread pool, so several sandbox threads can wait on the host at once. No polling on a timer: a
reader thread blocks on the transport (a pipe read, or the HTTP transport's long poll) and wakes exactly the
waiter a message is for.

Timeouts: at `cell_timeout_s` the cell is interrupted (KeyboardInterrupt inside, namespace kept); if it has
not stopped `kill_grace_s` later the server is killed. The state is then lost, and the session says so: the
killed cell's result explains it, and the next cell runs in a fresh server with the registered tools and the
injected inputs restored and a notice at the top of its output. Waiting on host calls extends
`cell_timeout_s`, but never past `cell_ceiling_s` from the cell's start nor past the run's deadline.

Bounds (`max_message_mb`): no frame from the server is held past the limit; a server that sends a longer
or undecodable one, or announces its exit, is stopped and handled like a dead one (the reason in the cell's
error). Host-call arguments and host results over the limit are answered with an error naming the setting,
and the calls held at once (queued or running) are bounded, so no server can grow the host without end.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import itertools
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterator, Optional, Protocol

from rlm_pipelines.config import ReplConfig
from rlm_pipelines.repl.convert import jsonable
from rlm_pipelines.repl.protocol import CellError, CellResult, ProtocolViolation, frame_limit, too_large
from rlm_pipelines.text import clip, safe_data, safe_text

log = logging.getLogger(__name__)


class ReplError(RuntimeError):
    """The REPL server itself failed (could not start, broke the protocol). Terminal for that server."""


class ReplDied(ReplError):
    """The REPL server process exited; everything defined in it is lost."""


class Transport(Protocol):
    """A message pipe to one REPL server process (stdio pipes locally, HTTP for remote sandboxes)."""

    def send(self, message: dict[str, Any]) -> None: ...

    def messages(self, max_bytes: int) -> Iterator[dict[str, Any]]:
        """Blocking iterator over messages from the server (made safe: `protocol.decode`); ends when the
        server is gone; raises ProtocolViolation for a frame over `max_bytes` (never read whole) or one
        that is not a message."""
        ...

    def kill(self) -> None:
        """Stop the server now (idempotent)."""
        ...

    def exit_info(self) -> str:
        """Why the server is gone, for error messages (exit code, last stderr lines)."""
        ...


class _Connection:
    """One live server: its transport, reader thread and the futures waiting on it.

    Only frames the host expects are acted on: a `result` for an id it issued and still waits for (a
    second result for the same id, or one for an id never issued, is dropped), one `hello`. A frame over
    the limit, an undecodable one or an `exit` message ends the server with the reason, told to the cell."""

    def __init__(self, transport: Transport, on_call: Callable[["_Connection", dict], None], max_bytes: int):
        self.transport = transport
        self.on_call = on_call
        self.max_bytes = max_bytes
        self.waiting: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.hello: Future = Future()
        self.dead = False
        threading.Thread(target=self._read, name="repl-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            error = self._dispatch()
        except ProtocolViolation as exc:
            error = ReplDied(f"the REPL server broke the protocol ({exc}), so it was stopped")
        except Exception as exc:  # a garbled channel is as fatal as a dead process
            log.warning("REPL channel failed: %r", exc)
            error = ReplDied(f"the REPL channel failed ({type(exc).__name__}: {exc}), so the REPL was stopped")
        if error is None:
            error = ReplDied(f"the REPL process exited ({self.transport.exit_info()})")
        else:  # the server may still be running (and writing): stop it before anyone waits on it
            self.transport.kill()
        self._fail(error)

    def _dispatch(self) -> Optional[ReplDied]:
        """Act on messages until the channel ends; the reason when the server announced its exit."""
        for message in self.transport.messages(self.max_bytes):
            kind = message.get("type")
            if kind == "result":
                key = message.get("id")
                with self.lock:
                    future = self.waiting.pop(key, None) if type(key) is int else None
                if future is not None:
                    future.set_result(message)
            elif kind == "call":
                self.on_call(self, message)
            elif kind == "hello":
                if not self.hello.done():
                    self.hello.set_result(message)
            elif kind == "exit":
                reason = clip(str(message.get("reason") or "no reason given"), 2000)
                return ReplDied(f"the REPL server stopped: {reason}")
        return None

    def _fail(self, error: Exception) -> None:
        with self.lock:
            self.dead = True
            waiting, self.waiting = list(self.waiting.values()), {}
        for future in waiting + [self.hello]:
            if not future.done():
                future.set_exception(error)

    def request(self, message: dict[str, Any]) -> Future:
        future: Future = Future()
        with self.lock:
            if self.dead:
                future.set_exception(ReplDied(f"the REPL process exited ({self.transport.exit_info()})"))
                return future
            self.waiting[message["id"]] = future
        self.send(message)
        return future

    def send(self, message: dict[str, Any]) -> None:
        """Send, or end this connection with the reason: a failed send is a dead (or broken) server."""
        try:
            self.transport.send(message)
        except ProtocolViolation as exc:  # e.g. an oversize answer to a post
            self.transport.kill()
            self._fail(ReplDied(f"the REPL server broke the protocol ({exc}), so it was stopped"))
        except OSError as exc:  # the server is gone (broken pipe, unreachable): same as a dead process
            self._fail(ReplDied(f"the REPL server cannot be reached ({exc}; {self.transport.exit_info()})"))

    def kill(self) -> None:
        self.transport.kill()
        self._fail(ReplDied("the REPL process was killed"))


VARS_FILE_MIN_BYTES = 64 * 1024  # inputs larger than this travel as an uploaded file


class ReplSession:
    def __init__(self, spawn: Callable[[], Transport], config: Optional[ReplConfig] = None,
                 stage: Optional[Callable[[str, bytes], str]] = None):
        """`stage(name, data) -> path inside`, where the sandbox has it, writes a file in the sandbox's temp
        dir: large inputs go that way once (a restarted server reads the same file again) instead of
        through the message channel."""
        self.config = config or ReplConfig()
        self._spawn = spawn
        self._stage = stage
        self._vars_files: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # one request at a time; calls from the sandbox do not take it
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._tools: dict[str, Callable[..., Any]] = {}
        self._registration: Optional[dict[str, Any]] = None
        self._vars: dict[str, Any] = {}
        self._lost: str = ""  # why the previous server died, told to the model once
        self._inflight = 0  # host calls being answered right now (a cell waiting on them is not stuck)
        # Host functions run in the context of whoever runs the cell (e.g. a Prefect task run), so what
        # they start is attributed to it.
        self._cell_context = contextvars.copy_context()
        self._inflight_lock = threading.Lock()
        self._max_bytes = int(self.config.max_message_mb * 1024 * 1024)
        self._held: dict[int, int] = {}  # calls queued or being answered: call id -> argument bytes
        self._held_lock = threading.Lock()
        self._closed = False
        # Why the sandbox stopped its processes since the last call (a sandbox-wide limit), set by the sandbox
        # that keeps this session; told to the model with the cell it hit.
        self.sandbox_notices: Callable[[], str] = lambda: ""
        self._conn = self._connect()

    # -- lifecycle

    def _connect(self) -> _Connection:
        conn = _Connection(self._spawn(), self._on_call, frame_limit(self.config.max_message_mb))
        try:
            conn.hello.result(timeout=self.config.start_timeout_s)
        except FutureTimeout:
            conn.kill()
            raise ReplError(f"the REPL server did not start within {self.config.start_timeout_s:g} s") from None
        except ReplDied as exc:
            raise ReplError(f"the REPL server failed to start: {exc}") from None
        return conn

    def _ensure_alive(self) -> None:
        if self._closed:
            raise ReplError("this REPL session is closed")
        if not self._conn.dead:
            return
        self._conn.kill()  # reap the dead process and close its pipes
        self._conn = self._connect()
        if self._registration is not None:
            self._command({**self._registration, "type": "register"})
        for path in self._vars_files:
            self._command({"type": "set_vars", "file": path})
        if self._vars:
            self._command({"type": "set_vars", "vars": self._vars})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.transport.send({"type": "shutdown"})
        except Exception:
            pass
        self._conn.kill()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ReplSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return not self._closed and not self._conn.dead

    # -- setup

    def register(self, tools: dict[str, Callable[..., Any]], submit_fields: Optional[list[str]] = None,
                 final: bool = False) -> None:
        """Expose host functions to sandbox code by name, and the run-ending builtins."""
        with self._lock:
            self._tools = dict(tools)
            self._registration = {
                "tools": [_tool_spec(name, fn) for name, fn in self._tools.items()],
                "submit_fields": list(submit_fields) if submit_fields is not None else None,
                "final": final,
            }
            self._ensure_alive()
            self._command({**self._registration, "type": "register"})

    def set_vars(self, variables: dict[str, Any]) -> None:
        """Inject JSON-compatible values as globals. Sent once; kept to restore them after a restart."""
        with self._lock:
            self._ensure_alive()
            variables = safe_data(variables)  # a lone surrogate in an input cannot be written as UTF-8
            data = json.dumps(variables, ensure_ascii=False).encode() if self._stage is not None else b""
            if len(data) >= VARS_FILE_MIN_BYTES:
                path = self._stage(f".rlm-inputs-{len(self._vars_files) + 1}.json", data)
                self._command({"type": "set_vars", "file": path})
                self._vars_files.append(path)
                for name in variables:  # a later small value of the same name must not be shadowed
                    self._vars.pop(name, None)
            else:
                self._command({"type": "set_vars", "vars": variables})
                self._vars.update(variables)

    def _command(self, message: dict[str, Any]) -> dict[str, Any]:
        message["id"] = next(self._ids)
        reply = self._conn.request(message).result(timeout=self.config.start_timeout_s)
        if reply.get("error"):
            error = reply["error"]
            raise ValueError(f"{message['type']} failed in the REPL: {error['type']}: {error['message']}")
        return reply

    # -- cells

    def execute(self, code: str, timeout_s: Optional[float] = None, deadline: Optional[float] = None) -> CellResult:
        """Run one cell. The model's own errors come back in the result; ReplError only if the server cannot
        be started at all.

        `timeout_s` bounds the cell's own work: while the cell waits on a host call (a sub-agent, say) its
        limit is extended, up to `cell_ceiling_s` from its start. `deadline` (time.monotonic()) is absolute
        and never extended: the run's end."""
        timeout = self.config.cell_timeout_s if timeout_s is None else timeout_s
        size = len(json.dumps(code))  # as it travels: ASCII JSON
        if size > self._max_bytes:  # the server would refuse the frame, and the REPL with it
            return CellResult(error=CellError("ValueError", too_large("this cell's code", size,
                                                                      self.config.max_message_mb)))
        with self._lock:
            self._ensure_alive()
            notice, self._lost = self._lost, ""
            stopped = self.sandbox_notices()  # between cells: the server may be gone for it
            if stopped:
                notice = f"[Before this cell, {stopped}.]\n{notice}".rstrip("\n")
            self._cell_context = contextvars.copy_context()
            cell_id = next(self._ids)
            conn = self._conn
            started = time.monotonic()
            ceiling = started + self.config.cell_ceiling_s
            hard = ceiling if deadline is None else min(deadline, ceiling)
            future = conn.request({"type": "exec", "id": cell_id, "code": code})
            try:
                result = CellResult.from_message(self._wait(future, timeout, hard))
            except FutureTimeout:
                result = self._stop_overdue(conn, cell_id, future, self._limit(timeout, ceiling, deadline), started)
            except ReplDied as exc:
                stopped = self.sandbox_notices()
                why = f"{stopped} ({exc})" if stopped else str(exc)
                self._lost = (f"[The REPL was restarted: {why} during the previous cell. Variables and imports "
                              f"from earlier cells are lost; the inputs were injected again.]")
                result = CellResult(error=CellError("ReplDied", f"{why}. All REPL state is lost; the next cell "
                                                    f"runs in a fresh REPL with the inputs injected again."))
            result.notice = notice
            return result

    def _wait(self, future: Future, timeout: float, hard: float) -> dict[str, Any]:
        """The cell's result; FutureTimeout after `timeout` without a host call pending, or at `hard`
        (time.monotonic(): the cell's ceiling or the run's deadline), whatever is pending."""
        while True:
            left = hard - time.monotonic()
            if left <= 0:
                raise FutureTimeout
            try:
                return future.result(timeout=min(timeout, left))
            except FutureTimeout:
                if self._inflight == 0 or time.monotonic() >= hard:
                    raise

    def _limit(self, timeout: float, ceiling: float, deadline: Optional[float]) -> str:
        """Which limit an overdue cell ran past, named so the model (and the user) knows which setting."""
        now = time.monotonic()
        if deadline is not None and now >= deadline and deadline <= ceiling:
            return "the run's deadline (limits.wall_time_s)"
        if now >= ceiling:
            return (f"its {self.config.cell_ceiling_s:g} s ceiling (sandbox.repl.cell_ceiling_s; waiting on host "
                    f"functions does not extend it)")
        return f"its {timeout:g} s limit (sandbox.repl.cell_timeout_s)"

    def _stop_overdue(self, conn: _Connection, cell_id: int, future: Future, limit: str,
                      started: float) -> CellResult:
        conn.send({"type": "interrupt", "id": cell_id})
        grace = self.config.kill_grace_s
        try:
            result = CellResult.from_message(future.result(timeout=grace))
        except (FutureTimeout, ReplDied):
            conn.kill()
            self._lost = (f"[The REPL was restarted: the previous cell ran past {limit} and ignored the "
                          f"interrupt, so the REPL was killed. Variables and imports from earlier cells are lost; "
                          f"the inputs were injected again.]")
            return CellResult(error=CellError(
                "TimeoutError",
                f"the cell ran past {limit} and ignored the interrupt for {grace:g} s, so the REPL process was "
                f"killed: ALL state (variables, imports, functions) is lost. The next cell runs in a fresh REPL "
                f"with the inputs injected again."), duration_s=time.monotonic() - started)
        if result.error is not None and result.error.type == "KeyboardInterrupt":
            message = f"the cell ran past {limit} and was interrupted; variables defined so far are kept"
            where = result.error.traceback.rstrip("\n").rpartition("\n")[0]  # drop "KeyboardInterrupt: ..."
            result.error = CellError("TimeoutError", message, f"{where}\nTimeoutError: {message}\n".lstrip())
        return result

    def interrupt(self) -> None:
        """Interrupt whatever cell is running (e.g. on Ctrl-C or a global timeout)."""
        if not self._conn.dead:
            self._conn.send({"type": "interrupt"})

    # -- calls from sandbox code

    def _on_call(self, conn: _Connection, message: dict[str, Any]) -> None:
        """Queue a call for the pool, or answer at once why not. Runs on the reader thread, so a refusal's
        reply holds up reading: a server that floods the host with calls is slowed down, not buffered."""
        call_id = message.get("call_id")
        if type(call_id) is not int:
            return  # nothing in the sandbox can be waiting for an answer to it
        refusal = self._admit(call_id, message)
        if refusal is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.config.host_workers, thread_name_prefix="repl-call")
            try:
                self._pool.submit(self._cell_context.copy().run, self._answer, conn, message)
            except RuntimeError:  # pool shut down: the session is closing
                self._release(call_id)
        elif refusal:
            conn.send({"type": "reply", "call_id": call_id, "error": refusal})

    def _admit(self, call_id: int, message: dict[str, Any]) -> Optional[str]:
        """None when the call may run; else why not ("" when it must not be answered at all: a second
        call with the id of one still being answered)."""
        name, args, kwargs = message.get("name"), message.get("args", []), message.get("kwargs", {})
        if not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            return "ValueError: a host call needs a name, a list of arguments and a dict of keyword arguments"
        size = len(json.dumps([args, kwargs]))
        if size > self._max_bytes:
            return f"ValueError: {too_large(f'the arguments of {name}()', size, self.config.max_message_mb)}"
        most = self.config.host_workers * HELD_PER_WORKER
        with self._held_lock:
            if call_id in self._held:
                return ""
            if len(self._held) >= most or sum(self._held.values()) + size > HELD_FRAMES * self._max_bytes:
                return (f"RuntimeError: too many host calls at once ({len(self._held)} waiting, "
                        f"{sum(self._held.values()) / 1024 / 1024:.0f} MB of arguments; at most {most} calls "
                        f"and {HELD_FRAMES * self.config.max_message_mb:g} MB): wait for some to finish")
            self._held[call_id] = size
        return None

    def _release(self, call_id: int) -> None:
        with self._held_lock:
            self._held.pop(call_id, None)

    def _answer(self, conn: _Connection, message: dict[str, Any]) -> None:
        call_id, name = message["call_id"], message["name"]
        reply: dict[str, Any] = {"type": "reply", "call_id": call_id}
        with self._inflight_lock:
            self._inflight += 1
        try:
            function = self._tools.get(name)
            if function is None:
                raise NameError(f"no host function named {name!r}")
            value = function(*message["args"], **message["kwargs"])
            if inspect.isawaitable(value):  # an async tool: awaited here, in the cell's context
                value = run_awaitable(value)
            # models, dataclasses, sets... as dspy converts them; lone surrogates -> U+FFFD
            value = safe_data(jsonable(value, f"the result of {name}()", records=True))
            size = len(json.dumps(value))
            if size > self._max_bytes:
                raise ValueError(too_large(f"the result of {name}()", size, self.config.max_message_mb))
            reply["value"] = value
        except Exception as exc:
            reply["error"] = safe_text(f"{type(exc).__name__}: {exc}")
        finally:
            with self._inflight_lock:
                self._inflight -= 1
            self._release(call_id)
        if not conn.dead:
            conn.send(reply)


HELD_PER_WORKER = 4  # host calls queued or running, per host worker, before more are refused
HELD_FRAMES = 16  # their arguments together, in full-size frames


def run_awaitable(awaitable: Any) -> Any:
    """Run an async tool's awaitable to its end on this host-call thread, in this thread's context (the
    cell's, so dspy's settings and callbacks hold inside it). A host-call thread runs no event loop of its
    own; the loop that called `execute` (dspy's `aforward`) is blocked in it, so a loop of its own it is."""
    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


def _tool_spec(name: str, function: Callable[..., Any]) -> dict[str, Any]:
    """Name, parameters and doc of a host function, so the sandbox-side stub has a real signature."""
    try:
        params = [str(p).split(":")[0] if p.default is p.empty else f"{p.name}={p.default!r}"
                  for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):
        params = None
    return {"name": name, "params": params, "doc": inspect.getdoc(function) or ""}
