"""The litellm caller: one place for keys, prices, retries and usage, shared by both engines. litellm is
imported lazily (importing it costs seconds), so importing this module is cheap."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Awaitable, Callable, Optional, TypeVar, Union

from rlm_pipelines.config import ModelSpec, SubModelSpec
from rlm_pipelines.models.usage import CallRecord, UsageLedger
from rlm_pipelines.text import safe_text

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_CAP_S = 30.0  # no single wait between retries is longer
DEADLINE_SLACK_S = 0.5  # a call failing this close to the run's deadline failed because of it


class ModelError(RuntimeError):
    """A model call failed for good. The message names the model and carries the provider's own words;
    `attempts` says how many were made and `transient` whether the pipeline may retry its whole step."""

    attempts: int = 1
    transient: bool = False


class MissingKeyError(ModelError):
    """The API key a model needs is not in the environment (raised before any sandbox starts)."""


def check_key(spec: ModelSpec) -> None:
    """Fail before anything starts when a key the model (or its sub-model) needs is not set. A replay needs
    none, unless a call it lacks goes to the recorded run's live model (model.on_miss=live)."""
    if spec.source:
        if spec.on_miss != "live":
            return
        from rlm_pipelines.models.callstore import replay_spec

        spec = replay_spec(spec)
    for each in (spec, sub_spec(spec)):
        if each.api_key_env and not os.environ.get(each.api_key_env):
            raise MissingKeyError(f"model {each.model!r} needs an API key: set the environment variable "
                                  f"{each.api_key_env} (e.g. `export {each.api_key_env}=...`)")


def sub_spec(spec: ModelSpec) -> ModelSpec:
    """The model `llm_query` talks to: the non-null fields of `spec.sub` on top of the main model (so an
    empty `sub` means the main model itself)."""
    overrides = {k: v for k, v in asdict(spec.sub).items() if v is not None} if spec.sub else {}
    if not overrides:
        return spec
    return replace(spec, **overrides, sub=SubModelSpec())


def litellm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """What litellm needs to reach the model. The key is read from its env var now, at call time, and is
    never stored in the spec, the ledger or the run tree."""
    kwargs: dict[str, Any] = {"temperature": spec.temperature, "max_tokens": spec.max_tokens,
                              "timeout": spec.timeout_s}
    if spec.api_key_env:
        kwargs["api_key"] = os.environ.get(spec.api_key_env, "")
    elif spec.api_base:  # local OpenAI-compatible servers ignore the key, but the OpenAI client wants one
        kwargs["api_key"] = "no-key"
    if spec.api_base:
        kwargs["api_base"] = spec.api_base
    if spec.stop:  # per-model quirks: only sent when the config sets them
        kwargs["stop"] = list(spec.stop)
    if spec.reasoning_effort:
        kwargs["reasoning_effort"] = spec.reasoning_effort
    return kwargs


_registered: dict[str, tuple[float, float]] = {}
_registered_lock = threading.Lock()


def register_prices(spec: ModelSpec) -> None:
    """Teach litellm's cost map the prices the config gives (for the model and its sub-model), e.g. for a
    model the bundled map lacks; explicit prices win over bundled ones. Idempotent, and registers again
    when a model's prices change (another run in the same process).

    A model with no price in the map and none in its config costs $0, with a one-time warning."""
    import litellm

    for each in (spec, sub_spec(spec)):
        if each.input_cost_per_mtok is None and each.output_cost_per_mtok is None:
            continue
        prices = (each.input_cost_per_mtok or 0.0, each.output_cost_per_mtok or 0.0)
        with _registered_lock:
            if _registered.get(each.model) == prices:
                continue
            _registered[each.model] = prices
            per_input_token = prices[0] / 1e6
            litellm.register_model({each.model: {
                "input_cost_per_token": per_input_token,
                "output_cost_per_token": prices[1] / 1e6,
                # One input price in the config: cached prompt tokens are charged at it too (litellm would
                # otherwise count them free, and warn about it).
                "cache_read_input_token_cost": per_input_token,
                "cache_creation_input_token_cost": per_input_token,
                "litellm_provider": each.model.split("/", 1)[0],
                "mode": "chat",
            }})


_unpriced: set[str] = set()


def warn_unpriced(model: str) -> None:
    """Once per model: its calls count as $0 because no price is known."""
    if model not in _unpriced and not model.startswith("scripted/"):
        _unpriced.add(model)
        log.warning("no price known for model %s: its cost counts as $0 (set input_cost_per_mtok and "
                    "output_cost_per_mtok in its model config)", model)


def completion_cost(response: Any, model: str) -> float:
    """Dollars for one litellm response, from litellm's cost map (bundled + `register_prices`)."""
    import litellm

    if getattr(response, "model", "") == "scripted":
        return 0.0
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:
        warn_unpriced(model)
        return 0.0


# --------------------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections are worth retrying; a 400, a 401, a 404 or a context
    window error is not. Errors come from litellm itself (repo engine) or wrapped by dspy (document engine)."""
    import litellm

    transient = (litellm.RateLimitError, litellm.InternalServerError, litellm.ServiceUnavailableError,
                 litellm.BadGatewayError, litellm.Timeout, litellm.APIConnectionError)
    if isinstance(exc, transient):
        return True
    dspy_errors = sys.modules.get("dspy.utils.exceptions")  # only when dspy is in use: importing it costs
    if dspy_errors is not None and dspy_errors.is_retryable_lm_error(exc):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def retry_delay(exc: Exception, attempt: int, spec: ModelSpec, deadline: Optional[float] = None) -> Optional[float]:
    """Seconds to wait after failed attempt `attempt` (0-based) before the next one, or None to give up.

    Exponential backoff with jitter (so parallel llm_query calls do not retry in lockstep), or the
    provider's Retry-After hint when the error carries one; no retry starts after `deadline`
    (time.monotonic())."""
    if attempt >= spec.num_retries or not is_transient(exc):
        return None
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, (int, float)) and hint >= 0:
        delay = min(RETRY_CAP_S, float(hint))
    else:
        delay = min(RETRY_CAP_S, spec.retry_base_s * 2 ** attempt) * (0.5 + random.random() / 2)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def with_retries(call: Callable[[], T], spec: ModelSpec, deadline: Optional[float] = None) -> tuple[T, int]:
    """Run `call`, retrying transient errors per `retry_delay`; returns (result, attempts). The final
    failure is a `ModelError`; at the run's `deadline` (time.monotonic()) it is `BudgetExceeded` (timeout),
    never retried: no attempt starts after it, and a call that fails once it passed failed because of it."""
    for attempt in itertools.count():
        check_deadline(deadline, spec)
        try:
            return call(), attempt + 1
        except Exception as exc:
            delay = _next_delay(exc, attempt, spec, deadline)
            _log_retry(spec, exc, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


async def with_retries_async(call: Callable[[], Awaitable[T]], spec: ModelSpec,
                             deadline: Optional[float] = None) -> tuple[T, int]:
    """`with_retries` for coroutines (dspy's `acall`): the same policy, waiting without blocking the loop."""
    for attempt in itertools.count():
        check_deadline(deadline, spec)
        try:
            return await call(), attempt + 1
        except Exception as exc:
            delay = _next_delay(exc, attempt, spec, deadline)
            _log_retry(spec, exc, attempt, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def call_timeout(spec: ModelSpec, deadline: Optional[float]) -> float:
    """The timeout of one attempt: the model's `timeout_s`, cut to the time left before the deadline."""
    if deadline is None:
        return spec.timeout_s
    return max(0.1, min(spec.timeout_s, deadline - time.monotonic()))


def check_deadline(deadline: Optional[float], spec: ModelSpec) -> None:
    """Raise BudgetExceeded (timeout) once the run's deadline has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        from rlm_pipelines.budget import BudgetExceeded  # here: budget imports this package

        raise BudgetExceeded(f"wall time limit reached (limits.wall_time_s) during a call to model {spec.model}",
                             status="timeout")


def _next_delay(exc: Exception, attempt: int, spec: ModelSpec, deadline: Optional[float]) -> float:
    """The wait before the next attempt, or raise: the deadline's BudgetExceeded as it is, a failure after
    the deadline as one, anything else that is not retried as a ModelError."""
    from rlm_pipelines.budget import BudgetExceeded

    if isinstance(exc, BudgetExceeded):
        raise exc
    try:  # a timeout cut to the time left may fire a moment before the deadline: that is the deadline too
        check_deadline(None if deadline is None else deadline - DEADLINE_SLACK_S, spec)
    except BudgetExceeded as timeout:
        raise timeout from exc
    delay = retry_delay(exc, attempt, spec, deadline)
    if delay is None:
        raise as_model_error(exc, spec.model, attempt + 1) from exc
    return delay


def _log_retry(spec: ModelSpec, exc: Exception, attempt: int, delay: float) -> None:
    log.warning("model %s: transient error (%s), retry %d/%d in %.2f s", spec.model, _short(exc), attempt + 1,
                spec.num_retries, delay)


def as_model_error(exc: Exception, model: str, attempts: int) -> ModelError:
    if isinstance(exc, ModelError):
        return exc
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    error = ModelError(f"model {model} failed{tried}: {type(exc).__name__}: {_short(exc, 2000)}")
    error.attempts = attempts
    error.transient = is_transient(exc)
    return error


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the client


@dataclass
class Completion:
    text: str
    model: str  # the configured litellm model string
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    attempts: int
    finish_reason: str = "stop"  # "length": cut at max_tokens (the engines do not run a cut reply)
    reasoning: str = ""  # the provider's reasoning field, if it sends one (recorded, never run)
    origin: str = "live"  # live | cached | replayed (see models/callstore.py)


class LLMClient:
    """Calls one model through litellm (with litellm's own retries off: ours classify errors and back off
    with jitter), recording every call, failed or not, in the ledger. `calls` (a `callstore.Calls`) is the
    run's call path: calls.jsonl, replay, resume and the cache; None makes every call live, unrecorded."""

    def __init__(self, spec: ModelSpec, ledger: Optional[UsageLedger] = None, role: str = "", calls: Any = None):
        from rlm_pipelines.models import scripted

        scripted.install()
        self.spec = spec
        self.ledger = ledger if ledger is not None else UsageLedger()
        self.role = role
        self.calls = calls
        register_prices(spec)

    def complete(self, messages: Union[str, list[dict[str, Any]]], deadline: Optional[float] = None,
                 **overrides: Any) -> Completion:
        """One chat completion. `overrides` go to litellm (e.g. timeout=); no retry starts after `deadline`."""
        from rlm_pipelines.models.callstore import Calls, cache_on, request_of

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        spec = self.spec
        started = time.perf_counter()
        params = {"temperature": spec.temperature, "max_tokens": spec.max_tokens, "stop": list(spec.stop),
                  "reasoning_effort": spec.reasoning_effort, **overrides}  # all that changes the answer
        live = _LiveCall(self, messages, deadline, overrides)
        try:
            answer = (self.calls or Calls()).call(request_of(spec.model, messages, params), live, self.role,
                                                  cache_on(spec))
        except Exception as exc:  # a ModelError, the deadline's BudgetExceeded, or a replay that diverged
            attempts = exc.attempts if isinstance(exc, ModelError) else 1
            self.ledger.add(CallRecord(spec.model, duration_s=time.perf_counter() - started, ok=False,
                                       error=str(exc), attempts=attempts, role=self.role))
            raise
        record = CallRecord(spec.model, prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                            cost_usd=answer.cost_usd, duration_s=time.perf_counter() - started,
                            attempts=live.attempts, role=self.role, origin=answer.origin, saved_usd=answer.saved_usd)
        self.ledger.add(record)
        reply = answer.response
        return Completion(reply["text"], spec.model, record.prompt_tokens, record.completion_tokens,
                          record.cost_usd, live.attempts, reply.get("finish_reason") or "stop",
                          reply.get("reasoning", ""), answer.origin)


class _LiveCall:
    """One call made live (retries included); `attempts` says how many it took (1 when answered stored)."""

    def __init__(self, client: LLMClient, messages: list[dict[str, Any]], deadline: Optional[float],
                 overrides: dict[str, Any]):
        self.client, self.messages, self.deadline, self.overrides = client, messages, deadline, overrides
        self.attempts = 1

    def __call__(self) -> Any:
        import litellm

        from rlm_pipelines.models.callstore import Answer

        spec, deadline = self.client.spec, self.deadline

        def once() -> Any:  # the key is read per attempt, so a rotated key is picked up
            kwargs = {**litellm_kwargs(spec), "timeout": call_timeout(spec, deadline), **self.overrides}
            return litellm.completion(model=spec.model, messages=self.messages, num_retries=0, **kwargs)

        try:
            response, self.attempts = with_retries(once, spec, deadline)
        except ModelError as exc:
            self.attempts = exc.attempts
            raise
        usage = getattr(response, "usage", None)
        choice = response.choices[0]
        text = safe_text(choice.message.content or "")  # lone surrogates cannot be recorded
        reasoning = safe_text(getattr(choice.message, "reasoning_content", None) or "")
        return Answer({"text": text, "finish_reason": getattr(choice, "finish_reason", None), "reasoning": reasoning},
                      getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                      completion_cost(response, spec.model))
