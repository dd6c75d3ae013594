"""The Sandbox protocol: where model-written code runs.

Lifecycle of a sandbox:
    1. created from a `SandboxConfig` (no resources yet)
    2. `start()`: resources allocated (idempotent); `with sandbox:` calls it
    3. `run()`, `upload()`, `download()`, `open_repl()`: many times, from several threads
    4. `stop()`: every process it started is gone and its files are deleted (idempotent; `with` calls it,
       also on errors and Ctrl-C)

Paths given to `run(cwd=)`, `upload()` and `download()` are paths INSIDE the sandbox; relative paths are
relative to `workdir`.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union, runtime_checkable

from rlm_pipelines.repl.session import ReplSession


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, a path escaped it). Transient start failures are
    `SandboxStartError`, which the pipeline may retry."""


class SandboxStartError(SandboxError):
    pass


@runtime_checkable
class Sandbox(Protocol):
    id: str
    workdir: str  # the working directory inside the sandbox

    def start(self) -> None: ...

    def run(self, cmd: Union[str, Sequence[str]], cwd: Optional[str] = None,
            timeout: Optional[float] = None) -> tuple[int, str]:
        """Run a command (a string goes through `sh -c`) and return (exit code, stdout+stderr).
        On timeout the command is killed and the exit code is 124."""
        ...

    def upload(self, path: str, data: bytes) -> None: ...

    def download(self, path: str) -> bytes: ...

    def open_repl(self) -> ReplSession:
        """Start a REPL server in the sandbox and return the host-side session (closed by `stop()`)."""
        ...

    def stop(self) -> None: ...

    def __enter__(self) -> "Sandbox": ...

    def __exit__(self, *exc: object) -> None: ...
