"""The pipeline's steps in this process, without Prefect (`orchestration.prefect: false`): the same steps,
and the same retry rule for the engine step that the Prefect flow gets from task retries. SIGTERM and SIGHUP
end the run the way Ctrl-C does, recorded as `terminated`."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterator

from rlm_pipelines.pipeline import Run, Terminated, execute, is_transient_infra, open_run

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _with_retries(name: str, function: Callable[[Run], Any]) -> Callable[[Run], Any]:
    if name != "run engine":
        return function

    def engine_step(run: Run) -> Any:
        attempts = run.cfg.orchestration.retries + 1
        for attempt in range(attempts):
            try:
                return function(run)
            except Exception as exc:
                if attempt + 1 >= attempts or not is_transient_infra(exc):
                    raise
                run.progress.line(f"transient failure ({exc}); retrying the engine step")
                time.sleep(run.cfg.orchestration.retry_delay_s)

    return engine_step


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP raise `Terminated` in the main thread, so the run stops its sandboxes and writes its
    final record as on Ctrl-C (without this, the process died on the spot: `running`, sandbox folders left).
    Further signals are ignored while that clean-up runs; SIGKILL remains for a clean-up that hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        for number in SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signal.Signals(signum).name)

    previous = {number: signal.signal(number, terminate) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_steps(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """All steps in-process, without Prefect."""
    with _terminate_as_interrupt():
        return execute(open_run(config, run_dir), _with_retries)
