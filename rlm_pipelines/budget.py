"""Run-wide limits that both engines enforce: tokens, dollars and wall time."""

from __future__ import annotations

import time

from rlm_pipelines.config import LimitsConfig
from rlm_pipelines.models.usage import UsageLedger


class BudgetExceeded(Exception):
    """A run-wide limit was reached. `status` is what the run tree records: budget_exceeded or timeout."""

    def __init__(self, message: str, status: str = "budget_exceeded"):
        super().__init__(message)
        self.status = status


class Budget:
    def __init__(self, limits: LimitsConfig, ledger: UsageLedger):
        self.limits, self.ledger = limits, ledger
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self) -> None:
        """Raise BudgetExceeded when any run-wide limit is spent."""
        limits, usage = self.limits, self.ledger.snapshot()
        if self.elapsed() >= limits.wall_time_s:
            raise BudgetExceeded(f"wall time limit reached: {self.elapsed():.0f} s of limits.wall_time_s="
                                 f"{limits.wall_time_s:g}", status="timeout")
        if usage["tokens"] >= limits.max_tokens:
            raise BudgetExceeded(f"token budget spent: {usage['tokens']:,} of limits.max_tokens="
                                 f"{limits.max_tokens:,}")
        if usage["cost_usd"] >= limits.max_cost_usd:
            raise BudgetExceeded(f"dollar budget spent: ${usage['cost_usd']:.4f} of limits.max_cost_usd="
                                 f"{limits.max_cost_usd:g}")
