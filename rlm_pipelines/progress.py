"""What a person watching the console sees: one line per iteration, a progress bar per fan-out."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ConsoleProgress:
    def __init__(self, enabled: bool = True, console: Optional[Console] = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False)
        self._bar: Optional[Progress] = None
        self._task: Any = None
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def iteration(self, agent: str, index: int, limit: int, duration_s: float, usage: dict[str, Any],
                  status: str) -> None:
        self.line(f"[bold]{agent}[/] iteration {index}/{limit}  {duration_s:5.1f} s  "
                  f"llm calls {usage.get('calls', 0)}  tokens {usage.get('tokens', 0):,}  "
                  f"${usage.get('cost_usd', 0.0):.4f}  {status}")

    @contextlib.contextmanager
    def fan_out(self, what: str, total: int) -> Iterator[None]:
        """A bar for `total` parallel calls; `advance()` moves it as each one finishes."""
        if not self.enabled or total <= 1:
            yield
            return
        bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, transient=False)
        with self._lock:
            self._bar, self._task = bar, bar.add_task(what, total=total)
        with bar:
            try:
                yield
            finally:
                with self._lock:
                    self._bar = None

    def advance(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.advance(self._task)
