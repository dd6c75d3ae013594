"""`dspy.LM` for a model config, on litellm, so the document engine shares the repo engine's provider
layer: one cost map, one retry policy, one usage ledger."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from rlm_pipelines.config import ModelSpec
from rlm_pipelines.models.litellm_client import litellm_kwargs, register_prices, with_retries
from rlm_pipelines.models.usage import CallRecord, UsageLedger


def build_dspy_lm(spec: ModelSpec, ledger: Optional[UsageLedger] = None, role: str = "") -> Any:
    """A `dspy.LM` on the litellm engine (dspy 3.4 defaults to another one) that retries transient errors
    with our policy and records every call into `ledger`. `last_call()` gives the calling thread's latest
    prompt and reply (the run tree records them per iteration)."""
    import dspy

    from rlm_pipelines.models import scripted

    scripted.install()
    register_prices(spec)

    class RecordingLM(dspy.LM):
        """dspy's LM with our retry loop around each public call, and usage taken from the history entry
        dspy writes for it (it carries litellm's usage and cost)."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result, attempts = with_retries(lambda: super(RecordingLM, self).__call__(*args, **kwargs),
                                                spec.num_retries, f"model {spec.model}")
            except Exception as exc:
                if self.ledger is not None:
                    self.ledger.add(CallRecord(spec.model, duration_s=time.perf_counter() - started, ok=False,
                                               error=str(exc), attempts=getattr(exc, "attempts", 1),
                                               role=role))
                raise
            if self.ledger is not None:
                entry = getattr(self._last, "entry", None)
                usage = (entry or {}).get("usage") or {}
                self.ledger.add(CallRecord(spec.model, prompt_tokens=usage.get("prompt_tokens", 0) or 0,
                                           completion_tokens=usage.get("completion_tokens", 0) or 0,
                                           cost_usd=float((entry or {}).get("cost") or 0.0),
                                           duration_s=time.perf_counter() - started, attempts=attempts,
                                           role=role))
            return result

        def update_history(self, entry: dict[str, Any]) -> None:
            # dspy writes this in the calling thread, so a thread-local pairs it with its own call even
            # when llm_query_batched runs many at once. Only usage is kept: dspy's own history would hold
            # every prompt (whole chapters) for the life of the run.
            self._last.entry = {"usage": entry.get("usage"), "cost": entry.get("cost"),
                                "messages": entry.get("messages"), "outputs": entry.get("outputs")}

        def last_call(self) -> dict[str, Any]:
            return getattr(self._last, "entry", None) or {}

    kwargs = litellm_kwargs(spec)
    lm = RecordingLM(spec.model, engine="litellm", cache=False, num_retries=0,
                     temperature=kwargs.pop("temperature"), max_tokens=kwargs.pop("max_tokens"), **kwargs)
    lm.ledger = ledger
    lm._last = threading.local()
    return lm
