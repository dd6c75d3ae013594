"""`dspy.LM` for a model config, on litellm, so the document engine shares the repo engine's provider
layer: one cost map, one retry policy, one usage ledger.

Why a subclass and not a dspy callback: a callback's `on_lm_end` sees the outputs but neither the usage
nor the cost, and cannot retry. dspy 3.4.1 hands both to `update_history(entry)` at the end of every public
call (`__call__` / `acall`, in the caller's thread or task), so the subclass overrides that hook and wraps
the two public calls in our retry loop (dspy's own `num_retries` is set to 0: one policy for both engines).

This module imports dspy at the top: `rlm_pipelines.models` imports it only inside `build_dspy_lm`, so
dspy (and litellm) load only for runs that use them.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Protocol, runtime_checkable

import dspy

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.config import ModelSpec
from rlm_pipelines.models.litellm_client import (ModelError, call_timeout, litellm_kwargs, register_prices,
                                                 warn_unpriced, with_retries, with_retries_async)
from rlm_pipelines.models.callstore import Answer, Calls, cache_on, request_of
from rlm_pipelines.models.usage import CallRecord, UsageLedger
from rlm_pipelines.text import safe_data

# The history entry of the call in progress. A context variable, not an attribute: llm_query_batched runs
# many calls at once on threads, and async callers interleave on one thread; each call sees its own box.
_entry_box: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("rlm_dspy_entry", default=None)


@runtime_checkable
class CallHook(Protocol):
    """Sees every call of one `RecordingLM` (the document engine's sub-model, which everything the sandbox
    asks of a model reaches: llm_query and dspy's sub-agents alike), so each is checked and recorded once."""

    def before_call(self) -> None:
        """Raise to refuse the call (a budget is spent); it is then neither made nor recorded."""

    def after_call(self, messages: list[dict[str, Any]], answer: Optional[str], record: CallRecord) -> None:
        """The call as made: the request's messages, the reply's text (None when it failed) and its record."""


def build_dspy_lm(spec: ModelSpec, ledger: Optional[UsageLedger] = None, role: str = "",
                  deadline: Optional[float] = None, hook: Optional[CallHook] = None,
                  calls: Optional[Calls] = None) -> "RecordingLM":
    """A `dspy.LM` for `spec` that records every call into `ledger` (see `RecordingLM`), with the scripted
    provider installed and the model's prices registered."""
    from rlm_pipelines.models import scripted

    scripted.install()
    register_prices(spec)
    return RecordingLM(spec, ledger, role, deadline, hook, calls)


class RecordingLM(dspy.LM):
    """A `dspy.LM` on the litellm engine (dspy 3.4 defaults to its own `lm15` engine), response cache off
    (runs are real), that retries transient errors with our policy and records every call, failed or not,
    into `ledger` with `role` ("root" or "sub"). `last_call()` gives the calling thread's latest prompt and
    reply (the run tree records them per iteration).

    The key is read from its env var here, when the run builds its LM; dspy keeps it in `lm.kwargs` and
    strips every `api_*` argument from what it records.

    `deadline` (time.monotonic()), the run's end: each attempt's timeout is cut to the time left, and at the
    deadline a call raises `BudgetExceeded` (timeout) instead of starting or retrying.

    `hook` (a `CallHook`) is asked before each public call and told of it after; dspy's `copy()` is shallow,
    so copies made for sub-agents share it, the ledger and the deadline."""

    def __init__(self, spec: ModelSpec, ledger: Optional[UsageLedger] = None, role: str = "",
                 deadline: Optional[float] = None, hook: Optional[CallHook] = None, calls: Optional[Calls] = None):
        kwargs = litellm_kwargs(spec)
        super().__init__(spec.model, engine="litellm", cache=False, num_retries=0,
                         temperature=kwargs.pop("temperature"), max_tokens=kwargs.pop("max_tokens"), **kwargs)
        self.spec, self.ledger, self.role, self.deadline, self.hook = spec, ledger, role, deadline, hook
        self.calls = calls
        self._last = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call_dspy = super().__call__
        with self._recording(args, kwargs) as call:
            pending, answer = self._calls().begin(self._request(args, kwargs), self.role, cache_on(self.spec))
            if answer is None:
                try:
                    result, call.attempts = with_retries(lambda: call_dspy(*args, **self._bounded(kwargs)),
                                                         self.spec, self.deadline)
                except BaseException as exc:
                    self._calls().failed(pending, exc)
                    raise
                answer = _live_answer(result)
            self._calls().done(pending, answer)
            _stored_entry(answer, args, kwargs)
        return safe_data(answer.response["outputs"])  # a lone surrogate must not break the records or the REPL

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        call_dspy = super().acall
        with self._recording(args, kwargs) as call:
            pending, answer = self._calls().begin(self._request(args, kwargs), self.role, cache_on(self.spec))
            if answer is None:
                try:
                    result, call.attempts = await with_retries_async(
                        lambda: call_dspy(*args, **self._bounded(kwargs)), self.spec, self.deadline)
                except BaseException as exc:
                    self._calls().failed(pending, exc)
                    raise
                answer = _live_answer(result)
            self._calls().done(pending, answer)
            _stored_entry(answer, args, kwargs)
        return safe_data(answer.response["outputs"])

    def _calls(self) -> Calls:
        if self.calls is None:
            self.calls = Calls()  # no run: every call live, nothing written
        return self.calls

    def _request(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What the call's key is made of: the model, the messages, dspy's and this call's parameters."""
        params = {k: v for k, v in {**self.kwargs, **kwargs}.items() if k not in ("messages", "prompt")}
        return request_of(self.spec.model, _request(args, kwargs), params)

    def _bounded(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """This attempt's arguments, its timeout cut to the time left before the deadline."""
        if self.deadline is None:
            return kwargs
        return {**kwargs, "timeout": call_timeout(self.spec, self.deadline)}

    @contextlib.contextmanager
    def _recording(self, args: tuple, kwargs: dict[str, Any]) -> Iterator[SimpleNamespace]:
        """One public call, retries included: the hook may refuse it first; its usage (from dspy's history
        entry) or its failure goes into the ledger, and to the hook."""
        if self.hook is not None:
            self.hook.before_call()
        box: list = []
        token = _entry_box.set(box)
        started = time.perf_counter()
        call = SimpleNamespace(attempts=1)
        try:
            # dspy skips update_history when history is disabled; ours keeps nothing beyond this call.
            with dspy.context(disable_history=False):
                yield call
        except (ModelError, BudgetExceeded) as exc:
            record = self._record_failure(exc, started)
            if self.hook is not None:
                self.hook.after_call(_request(args, kwargs), None, record)
            raise
        finally:
            _entry_box.reset(token)
        record = self._record(box, started, call.attempts)
        if self.hook is not None:
            self.hook.after_call(_request(args, kwargs), _text((box[-1] if box else {}).get("outputs")), record)

    def _record(self, box: list, started: float, attempts: int) -> CallRecord:
        entry = box[-1] if box else {}
        self._last.entry = entry
        usage = entry.get("usage") or {}
        cost = entry.get("cost")
        if cost is None and entry.get("origin", "live") == "live":
            warn_unpriced(self.spec.model)
        record = CallRecord(self.spec.model, prompt_tokens=usage.get("prompt_tokens", 0) or 0,
                            completion_tokens=usage.get("completion_tokens", 0) or 0, cost_usd=float(cost or 0.0),
                            duration_s=time.perf_counter() - started, attempts=attempts, role=self.role,
                            origin=entry.get("origin", "live"), saved_usd=entry.get("saved_usd", 0.0))
        if self.ledger is not None:
            self.ledger.add(record)
        return record

    def _record_failure(self, exc: Exception, started: float) -> CallRecord:
        attempts = exc.attempts if isinstance(exc, ModelError) else 1
        record = CallRecord(self.spec.model, duration_s=time.perf_counter() - started, ok=False, error=str(exc),
                            attempts=attempts, role=self.role)
        if self.ledger is not None:
            self.ledger.add(record)
        return record

    def update_history(self, entry: dict[str, Any]) -> None:
        # Only what we need is kept, and only for this call: dspy's own history would hold every prompt
        # (whole chapters) for the life of the run.
        box = _entry_box.get()
        if box is not None:
            kept = {key: safe_data(entry.get(key)) for key in ("usage", "cost", "messages", "outputs")}
            choices = getattr(entry.get("response"), "choices", None) or [None]  # "length": cut at max_tokens
            box.append({**kept, "finish_reason": getattr(choices[0], "finish_reason", None)})

    def last_call(self) -> dict[str, Any]:
        """The calling thread's latest call: usage, cost, messages, outputs ({} before any)."""
        return getattr(self._last, "entry", None) or {}


def _live_answer(result: Any) -> Answer:
    """A live call's answer from its outputs and the usage dspy put in this call's history entry."""
    box = _entry_box.get() or []
    entry = box[-1] if box else {}
    usage = entry.get("usage") or {}
    return Answer({"outputs": safe_data(result)}, usage.get("prompt_tokens", 0) or 0,
                  usage.get("completion_tokens", 0) or 0, float(entry.get("cost") or 0.0))


def _stored_entry(answer: Answer, args: tuple, kwargs: dict[str, Any]) -> None:
    """A stored answer stands in for dspy's history entry (dspy was not called)."""
    box = _entry_box.get()
    if box is not None and answer.origin != "live":
        box.append({"usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens},
                    "cost": answer.cost_usd, "messages": _request(args, kwargs),
                    "outputs": answer.response["outputs"], "origin": answer.origin, "saved_usd": answer.saved_usd})


def _request(args: tuple, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages of a call as dspy's `LM` takes it: `messages=`, or a prompt (first argument or `prompt=`);
    not copied (the run tree clips what it keeps and writes it UTF-8-safe)."""
    messages = kwargs.get("messages")
    if messages:
        return list(messages)
    prompt = kwargs.get("prompt", args[0] if args else None)
    return [{"role": "user", "content": str(prompt or "")}]


def _text(outputs: Any) -> Optional[str]:
    """The text of a reply's first output (dspy gives strings, or dicts with `text` when tools are asked)."""
    if isinstance(outputs, list) and outputs:
        first = outputs[0]
        return first.get("text") if isinstance(first, dict) else str(first)
    return None
