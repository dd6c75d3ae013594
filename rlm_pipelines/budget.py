"""Run-wide limits that both engines enforce: tokens, dollars and wall time.

The wall time is one absolute deadline (`Budget.deadline`, time.monotonic()) from the moment the run opens:
both engines pass it to cells, model calls and host calls, so whatever is running when it passes is cut
there, not at the next check between iterations."""

from __future__ import annotations

import time

from rlm_pipelines.config import LimitsConfig
from rlm_pipelines.models.usage import UsageLedger


class BudgetExceeded(Exception):
    """A run-wide limit was reached. `status` is what the run tree records: budget_exceeded or timeout;
    `limit` the key of the limit met (e.g. "max_tokens"), so a refusal can be counted under it.
    Never transient: another attempt of the step would meet the same spent budget."""

    transient = False

    def __init__(self, message: str, status: str = "budget_exceeded", limit: str = "wall_time_s"):
        super().__init__(message)
        self.status, self.limit = status, limit


class Budget:
    def __init__(self, limits: LimitsConfig, ledger: UsageLedger):
        self.limits, self.ledger = limits, ledger
        self.started = time.monotonic()
        self.deadline = self.started + limits.wall_time_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        """Seconds until the deadline (0 once it has passed)."""
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self) -> BudgetExceeded:
        """The error that ends a run at its deadline."""
        return BudgetExceeded(f"wall time limit reached: {self.elapsed():.0f} s of limits.wall_time_s="
                              f"{self.limits.wall_time_s:g}", status="timeout")

    def check(self) -> None:
        """Raise BudgetExceeded when any run-wide limit is spent."""
        limits, usage = self.limits, self.ledger.snapshot()
        if time.monotonic() >= self.deadline:
            raise self.timed_out()
        if usage["tokens"] >= limits.max_tokens:
            raise BudgetExceeded(f"token budget spent: {usage['tokens']:,} of limits.max_tokens="
                                 f"{limits.max_tokens:,}", limit="max_tokens")
        if usage["cost_usd"] >= limits.max_cost_usd:
            raise BudgetExceeded(f"dollar budget spent: ${usage['cost_usd']:.4f} of limits.max_cost_usd="
                                 f"{limits.max_cost_usd:g}", limit="max_cost_usd")
