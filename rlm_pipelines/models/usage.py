"""Token usage and dollar cost, recorded per model call, for both the litellm and the dspy path."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class CallRecord:
    """One model call as the caller saw it: retries included, tokens and dollars as the provider billed."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    ok: bool = True
    error: str = ""
    attempts: int = 1
    role: str = ""  # "root" (the agent's own turns) or "sub" (llm_query)
    origin: str = "live"  # live | cached (cost 0, `saved_usd` what it cost once) | replayed (recorded cost)
    saved_usd: float = 0.0
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Usage:
    """Tokens, dollars and model calls as the run tree records them (`tree.USAGE_KEYS`), for the run, an
    agent or one iteration; made from the ledger's totals or from one completion, so the mapping between
    the ledger's names and the tree's is written once."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> "Usage":
        """The totals of `UsageLedger.snapshot()`."""
        return cls(snapshot["prompt_tokens"], snapshot["completion_tokens"], snapshot["cost_usd"],
                   snapshot["calls"])

    @classmethod
    def from_completion(cls, completion: Any) -> "Usage":
        """One model call (a `Completion`, or anything with its token and cost fields)."""
        return cls(completion.prompt_tokens, completion.completion_tokens, completion.cost_usd, 1)

    def minus(self, earlier: "Usage") -> "Usage":
        """What was used since `earlier` (totals then) up to these totals."""
        return Usage(self.prompt_tokens - earlier.prompt_tokens, self.completion_tokens - earlier.completion_tokens,
                     self.cost_usd - earlier.cost_usd, self.llm_calls - earlier.llm_calls)

    def as_tree(self) -> dict[str, Any]:
        """The run tree's usage dict; dollars rounded to 6 places (float sums and differences drift)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens": self.tokens, "cost_usd": round(self.cost_usd, 6), "llm_calls": self.llm_calls}


class UsageLedger:
    """Thread-safe totals of every model call of a run (llm_query fans out from many threads at once).

    `listener` sees each record as it is added (in the calling thread, outside the ledger's lock, so it
    may be slow or call back into the ledger): the run tree hooks in there.
    """

    def __init__(self, listener: Optional[Callable[[CallRecord], None]] = None):
        self.listener = listener
        self._lock = threading.Lock()
        self.records: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)
        if self.listener is not None:
            self.listener(record)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            records = list(self.records)
        by_model: dict[str, dict[str, Any]] = {}
        for r in records:
            m = by_model.setdefault(r.model, {"calls": 0, "errors": 0, "prompt_tokens": 0,
                                              "completion_tokens": 0, "cost_usd": 0.0})
            m["calls"] += 1
            m["errors"] += 0 if r.ok else 1
            m["prompt_tokens"] += r.prompt_tokens
            m["completion_tokens"] += r.completion_tokens
            m["cost_usd"] += r.cost_usd
        return {
            "calls": len(records),
            "errors": sum(not r.ok for r in records),
            "prompt_tokens": sum(r.prompt_tokens for r in records),
            "completion_tokens": sum(r.completion_tokens for r in records),
            "tokens": sum(r.prompt_tokens + r.completion_tokens for r in records),
            "cost_usd": round(sum(r.cost_usd for r in records), 6),
            "cached_calls": sum(r.origin == "cached" for r in records),
            "replayed_calls": sum(r.origin == "replayed" for r in records),
            "saved_usd": round(sum(r.saved_usd for r in records), 6),
            "by_model": by_model,
        }
