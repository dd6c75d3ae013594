"""The litellm caller: one place for keys, prices, retries and usage. The only file that imports litellm
(lazily: importing it costs seconds)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional, TypeVar, Union

from rlm_pipelines.config import ModelSpec, SubModelSpec
from rlm_pipelines.models.usage import CallRecord, UsageLedger

log = logging.getLogger(__name__)
T = TypeVar("T")

# Backoff between retries of transient errors: base * 2**attempt, with jitter, capped.
RETRY_BASE_S = float(os.environ.get("RLM_RETRY_BASE_S", "1.0"))
RETRY_CAP_S = 30.0


class ModelError(RuntimeError):
    """A model call failed for good. The message carries the provider's own words."""


class MissingKeyError(ModelError):
    pass


def check_key(spec: ModelSpec) -> None:
    """Fail before anything starts when the key the model needs is not set."""
    for each in (spec, sub_spec(spec)):
        if each.api_key_env and not os.environ.get(each.api_key_env):
            raise MissingKeyError(f"model {each.model!r} needs an API key: set the environment variable "
                                  f"{each.api_key_env} (e.g. `export {each.api_key_env}=...`), or choose "
                                  f"model=scripted to run offline")


def sub_spec(spec: ModelSpec) -> ModelSpec:
    """The model `llm_query` talks to: the non-null fields of `spec.sub` on top of the main model."""
    overrides = {k: v for k, v in asdict(spec.sub).items() if v is not None} if spec.sub else {}
    if not overrides:
        return spec
    return replace(spec, **overrides, sub=SubModelSpec())


def litellm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """What litellm needs to reach the model; the key is read from its env var at call time."""
    kwargs: dict[str, Any] = {"temperature": spec.temperature, "max_tokens": spec.max_tokens,
                              "timeout": spec.timeout_s}
    if spec.api_key_env:
        kwargs["api_key"] = os.environ.get(spec.api_key_env, "")
    elif spec.api_base:  # local OpenAI-compatible servers ignore the key, but the OpenAI client wants one
        kwargs["api_key"] = "no-key"
    if spec.api_base:
        kwargs["api_base"] = spec.api_base
    return kwargs


_registered: set[tuple[str, float, float]] = set()
_registered_lock = threading.Lock()


def register_prices(spec: ModelSpec) -> None:
    """Teach litellm's cost map the prices of a model its bundled map lacks (idempotent)."""
    import litellm

    for each in (spec, sub_spec(spec)):
        if each.input_cost_per_mtok is None and each.output_cost_per_mtok is None:
            continue
        key = (each.model, each.input_cost_per_mtok or 0.0, each.output_cost_per_mtok or 0.0)
        with _registered_lock:  # again when the prices change (another run in this process, a test)
            if key in _registered:
                continue
            _registered.add(key)
        litellm.register_model({each.model: {
            "input_cost_per_token": (each.input_cost_per_mtok or 0.0) / 1e6,
            "output_cost_per_token": (each.output_cost_per_mtok or 0.0) / 1e6,
            "litellm_provider": each.model.split("/", 1)[0],
            "mode": "chat",
        }})


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections are worth retrying; a 400 or a 401 is not."""
    import litellm
    from dspy.utils.exceptions import LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError

    transient = (litellm.RateLimitError, litellm.InternalServerError, litellm.ServiceUnavailableError,
                 litellm.BadGatewayError, litellm.Timeout, litellm.APIConnectionError,
                 LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError)
    if isinstance(exc, transient):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def with_retries(call: Callable[[], T], retries: int, what: str,
                 deadline: Optional[float] = None) -> tuple[T, int]:
    """Run `call`, retrying transient errors with exponential backoff; returns (result, attempts). No retry
    starts after `deadline` (time.monotonic())."""
    for attempt in range(retries + 1):
        try:
            return call(), attempt + 1
        except Exception as exc:
            delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** attempt) * (0.5 + random.random() / 2)
            late = deadline is not None and time.monotonic() + delay >= deadline
            if attempt >= retries or not is_transient(exc) or late:
                raise _as_model_error(exc, what, attempt + 1) from exc
            log.warning("%s: transient error (%s), retry %d/%d in %.1f s", what, _short(exc), attempt + 1,
                        retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _as_model_error(exc: Exception, what: str, attempts: int) -> ModelError:
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    error = ModelError(f"{what} failed{tried}: {type(exc).__name__}: {_short(exc, 2000)}")
    error.attempts = attempts  # type: ignore[attr-defined]
    error.transient = is_transient(exc)  # type: ignore[attr-defined]  # the pipeline may retry its step
    return error


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    attempts: int


class LLMClient:
    """Calls one model through litellm with our retry policy, recording every call in the ledger."""

    def __init__(self, spec: ModelSpec, ledger: Optional[UsageLedger] = None):
        from rlm_pipelines.models import scripted

        scripted.install()
        self.spec = spec
        self.ledger = ledger if ledger is not None else UsageLedger()
        register_prices(spec)

    def complete(self, messages: Union[str, list[dict[str, Any]]], deadline: Optional[float] = None,
                 **overrides: Any) -> Completion:
        """One chat completion. `overrides` go to litellm (e.g. timeout=); no retry starts after `deadline`."""
        import litellm

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        kwargs = {**litellm_kwargs(self.spec), **overrides}
        started = time.perf_counter()

        def once() -> Any:
            return litellm.completion(model=self.spec.model, messages=messages, num_retries=0, **kwargs)

        try:
            response, attempts = with_retries(once, self.spec.num_retries, f"model {self.spec.model}", deadline)
        except ModelError as exc:
            self.ledger.add(CallRecord(self.spec.model, duration_s=time.perf_counter() - started, ok=False,
                                       error=str(exc), attempts=getattr(exc, "attempts", 1)))
            raise
        usage = getattr(response, "usage", None)
        record = CallRecord(self.spec.model, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                            cost_usd=_cost(response), duration_s=time.perf_counter() - started,
                            attempts=attempts)
        self.ledger.add(record)
        text = response.choices[0].message.content or ""
        return Completion(text, self.spec.model, record.prompt_tokens, record.completion_tokens,
                          record.cost_usd, attempts)


_unpriced: set[str] = set()


def _cost(response: Any) -> float:
    import litellm

    if getattr(response, "model", "") == "scripted":
        return 0.0
    try:
        return float(litellm.completion_cost(completion_response=response) or 0.0)
    except Exception:
        model = getattr(response, "model", "?")
        if model not in _unpriced:
            _unpriced.add(model)
            log.warning("no price known for model %s: its cost counts as $0 (set input_cost_per_mtok and "
                        "output_cost_per_mtok in its model config)", model)
        return 0.0
