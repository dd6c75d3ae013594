"""The Sandbox protocol: where model-written code runs; what some backends can do besides; their shared base.

Lifecycle of a sandbox:
    1. created from its backend's config (no resources yet)
    2. `start()`: resources allocated (idempotent); `with sandbox:` calls it
    3. `run()`, `upload()`, `download()`, `open_repl()`: many times, from several threads
    4. `stop()`: every process it started is gone and its files are deleted (idempotent; `with` calls it,
       also on errors and Ctrl-C)

Paths given to `run(cwd=)`, `upload()` and `download()` are paths INSIDE the sandbox; relative paths are
relative to `workdir`. Capabilities only some backends have (`SupportsClone`, `SupportsFork`,
`SupportsSeed`, `SupportsHostView`) are protocols of their own: callers ask `isinstance(sandbox,
SupportsClone)`, never the kind.

`download()` takes files that sandbox code may have swapped for something hostile: it reads regular files
only, never blocks on a FIFO or device, stops at `max_bytes` (`DownloadTooLarge`) and at `deadline`
(a `time.monotonic()` value; `TimeoutError`).

This module imports nothing of the project at run time: `config.py` takes the paths from here.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:
    from rlm_pipelines.config import SandboxConfig
    from rlm_pipelines.repl.session import ReplSession

WORKSPACE = "/workspace"  # the working directory inside every sandbox (read-write, deleted at stop)
REPO_DIR = f"{WORKSPACE}/repo"  # where repo agents' checkouts are


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, a path escaped it). Transient start failures are
    `SandboxStartError`, which the pipeline may retry; setup that can never work is `SandboxConfigError`."""


class SandboxStartError(SandboxError):
    """Starting failed in a way another attempt may not (a provider's hiccup, a namespace limit)."""


class SandboxConfigError(SandboxError, ValueError):
    """The setup can never work as configured (bwrap missing with isolation=bwrap, no Daytona SDK or key, an
    impossible checkout): retrying cannot help, so it is never retried. A ValueError too, so the input checks
    report it as a usage error."""


class DownloadTooLarge(SandboxError):
    """A file to download is over the size the caller allows: nothing of it is kept."""

    def __init__(self, path: str, limit: int):
        super().__init__(f"{path} is over {limit >> 20} MB" if limit >= 1 << 20 else f"{path} is over {limit} bytes")
        self.path, self.limit = path, limit


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

    def download(self, path: str, max_bytes: Optional[int] = None, deadline: Optional[float] = None) -> bytes:
        """A regular file's bytes; `DownloadTooLarge` over `max_bytes`, `TimeoutError` past `deadline`."""
        ...

    def open_repl(self) -> ReplSession:
        """Start a REPL server in the sandbox and return the host-side session (closed by `stop()`)."""
        ...

    def stop(self) -> None: ...

    def __enter__(self) -> "Sandbox": ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class SupportsClone(Protocol):
    """A sandbox that cannot see the host's repo mirror and checks a repo out by itself (a cloud sandbox).
    Called on a started sandbox, before any model code runs."""

    def clone(self, url: str, path: str, branch: Optional[str] = None, commit: Optional[str] = None,
              bundle: Optional[Callable[[], Path]] = None) -> None:
        """Check out `url` at `commit` into `path` (inside); `bundle()` makes the repo as one file for
        sandboxes that must get it uploaded instead."""
        ...


@runtime_checkable
class SupportsFork(Protocol):
    """A started sandbox can be copied (files included) into a new, started one: sub-agents get a prepared
    checkout without checking out again. The fork is stopped on its own; stopping the original leaves it."""

    def fork(self, name: str) -> Sandbox: ...


@runtime_checkable
class SupportsSeed(Protocol):
    """A started sandbox can get a host folder copied in cheaply (hardlinks), e.g. a sub-agent's checkout."""

    def seed(self, base: Path, path: str) -> bool:
        """Make `path` (inside) a copy of `base` (a host folder); False where it cannot (copy another way)."""
        ...


@runtime_checkable
class SupportsHostView(Protocol):
    """The host can read a sandbox's files in place (a local sandbox): once every process in it is stopped,
    nothing in the sandbox can race what the host reads there (e.g. the root agent's patch)."""

    def host_view(self, path: str) -> Path:
        """Stop every process of the sandbox for good (no command or REPL starts in it again) and return the
        host folder of `path` (inside). The files stay until `stop()`."""
        ...


class BaseSandbox:
    """The lifecycle every backend shares: one lock, `start()` at most once (never after `stop()`), REPL
    sessions closed at `stop()`, `with`. A backend fills in `_create` (allocate; under the lock),
    `_prepare` (slow set-up after it; a failure stops the sandbox), `_detach` (take its resources; under the
    lock) and `_release` (free them; outside it), and says what it offers in `describe`."""

    config_class: ClassVar[type]  # the backend's config schema (rlm_pipelines.config)

    def __init__(self, config: SandboxConfig, name: str):
        self.config: Any = config
        self.name = name
        self.id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.workdir = WORKSPACE
        self._lock = threading.Lock()
        self._stopped = False
        self._started = False
        self._repls: list[ReplSession] = []
        self._notices: list[str] = []  # why the sandbox stopped its processes (a limit), oldest first
        self._enforcing = threading.Lock()  # held while a limit is enforced: notice readers wait for the end

    @classmethod
    def describe(cls, config: Any) -> dict[str, str]:
        """What model code gets here, for its prompt: `python` (version), `isolation`, `workdir`, `limits`
        (a sentence on the resources it may use, or "")."""
        raise NotImplementedError

    @classmethod
    def check(cls, config: Any) -> None:
        """Raise `SandboxConfigError` for a config that can never work here, before anything starts."""

    def start(self) -> None:
        with self._lock:
            if self._stopped:
                raise SandboxError(f"sandbox {self.id} was stopped; create a new one")
            if self._started:
                return
            self._create()
            self._started = True
        try:
            self._prepare()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            repls, self._repls = self._repls, []
            resources = self._detach()
        for repl in repls:
            repl.close()
        self._release(resources)

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _keep_repl(self, session: ReplSession) -> ReplSession:
        session.sandbox_notices = self._notice_reader()
        with self._lock:
            self._repls.append(session)
        return session

    def _note(self, notice: str) -> None:
        """Record why the sandbox stopped its processes: the next reader of each kind is told."""
        with self._lock:
            self._notices.append(notice)

    def _notice_reader(self) -> Callable[[], str]:
        """A reader of the notices recorded after this call; each call returns the ones it has not yet."""
        with self._lock:
            seen = len(self._notices)

        def unread() -> str:
            nonlocal seen
            with self._enforcing, self._lock:
                new, seen = self._notices[seen:], len(self._notices)
            return "; ".join(new)
        return unread

    def _create(self) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        pass

    def _detach(self) -> Any:
        return None

    def _release(self, resources: Any) -> None:
        pass
