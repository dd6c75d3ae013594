"""DaytonaSandbox: model-written code in a Daytona cloud sandbox. The only module that imports the Daytona
SDK (`daytona==0.226.1`), lazily: it costs ~3 s.

What runs where: commands go through the SDK's process API; the REPL server (`repl/server.py`, uploaded
once) runs as a background session command listening on a port, and the host reaches it through that
port's preview link with the HTTP transport (`repl/http.py`): preview token + a per-server secret on every
request. Large inputs are uploaded once as a file (see `ReplSession`), never re-sent per iteration.

Lifetime: a sandbox is created at `start()` with labels (`rlm-pipelines`, the run id, the task), network
blocked unless `sandbox.network`, `ephemeral` (deleted when it stops), an auto-stop interval and a TTL, so
that even if this process is killed outright Daytona deletes it. `stop()` deletes it (idempotent; the
engines call it in `finally`, so also on errors and Ctrl-C); an exit hook deletes any left, and
`python -m rlm_pipelines.sandbox cleanup` deletes orphans by label.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import posixpath
import secrets
import shlex
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from rlm_pipelines.config import DaytonaOptions, DaytonaSandboxConfig
from rlm_pipelines.repl.http import HttpTransport
from rlm_pipelines.repl import SERVER_PATH
from rlm_pipelines.repl.session import ReplSession
from rlm_pipelines.sandbox.base import (BaseSandbox, DownloadTooLarge, SandboxConfigError, SandboxError,
                                        SandboxStartError)

log = logging.getLogger(__name__)

RLM_DIR = "/tmp/.rlm"  # the server file and its secrets (inside the sandbox)
OWNER_LABEL = "rlm-pipelines"  # on every sandbox we make: what the clean-up command looks for
_LIVE: "weakref.WeakSet[DaytonaSandbox]" = weakref.WeakSet()
_clients: dict[tuple[str, Optional[str], Optional[str]], Any] = {}
_clients_lock = threading.Lock()


class MissingDaytonaKey(SandboxConfigError):
    """sandbox=daytona cannot work here (no key, no SDK); the message says what to do."""


NO_SDK = "sandbox=daytona needs the Daytona SDK: pip install 'rlm-pipelines[daytona]'"


def api_key(options: DaytonaOptions) -> str:
    key = os.environ.get(options.api_key_env, "")
    if not key:
        raise MissingDaytonaKey(
            f"sandbox=daytona needs a Daytona API key in ${options.api_key_env}: create one at "
            f"https://app.daytona.io/dashboard/keys and `export {options.api_key_env}=...` (or set "
            f"sandbox.daytona.api_key_env to the variable that holds it), or use sandbox=local")
    return key


def check(options: DaytonaOptions) -> None:
    """What `sandbox=daytona` needs before anything starts: the SDK and a key (without importing the SDK)."""
    import importlib.util

    if importlib.util.find_spec("daytona") is None:
        raise MissingDaytonaKey(NO_SDK)
    if options.checkout not in ("auto", "clone", "upload"):
        raise SandboxConfigError(f"sandbox.daytona.checkout must be auto, clone or upload, not {options.checkout!r}")
    api_key(options)


def client(options: DaytonaOptions) -> Any:
    """One SDK client per API URL and key for the whole process (it holds a connection pool)."""
    key = api_key(options)
    try:
        from daytona import Daytona, DaytonaConfig
    except ImportError as exc:
        raise MissingDaytonaKey(NO_SDK) from exc

    url = options.api_url or os.environ.get("DAYTONA_API_URL") or None
    with _clients_lock:
        cache_key = (key, url, options.target)
        if cache_key not in _clients:
            _clients[cache_key] = Daytona(DaytonaConfig(api_key=key, api_url=url, target=options.target))
        return _clients[cache_key]


def list_sandboxes(options: DaytonaOptions, labels: dict[str, str]) -> Any:
    """The account's sandboxes that carry all of `labels`, as SDK objects (each has `.delete(timeout=)`):
    what `python -m rlm_pipelines.sandbox cleanup` looks through. Raises MissingDaytonaKey without a key."""
    daytona = client(options)
    from daytona import ListSandboxesQuery

    return daytona.list(ListSandboxesQuery(labels=labels))


class DaytonaSandbox(BaseSandbox):
    config_class = DaytonaSandboxConfig

    def __init__(self, config: Optional[DaytonaSandboxConfig] = None, name: str = "sbx",
                 mounts: Optional[dict[str, str]] = None):
        """`mounts` cannot reach a cloud sandbox and are not used: repo checkouts come through `clone()`."""
        super().__init__(config or DaytonaSandboxConfig(), name)
        self.options = self.config.daytona
        self.id = f"{name}-unstarted"
        self.workdir = self.options.workdir
        self.sdk: Any = None  # the SDK's Sandbox once started
        self._ports = itertools.count(self.options.repl_port)
        self._server_ready = False

    @classmethod
    def describe(cls, config: DaytonaSandboxConfig) -> dict[str, str]:
        # The sandbox's Python is whatever its snapshot or image has.
        return {"python": "3", "isolation": "daytona", "workdir": config.daytona.workdir,
                "limits": "Memory, disk and processes are limited by the sandbox's resources."}

    @classmethod
    def check(cls, config: DaytonaSandboxConfig) -> None:
        check(config.daytona)

    # -- lifecycle

    def _create(self) -> None:
        self.sdk = self._new_sdk_sandbox()
        self.id = self.sdk.id
        _LIVE.add(self)

    def _prepare(self) -> None:
        self._must("mkdir -p {w} 2>/dev/null || {{ sudo -n mkdir -p {w} && sudo -n chown \"$(id -u)\" {w}; }}"
                   .format(w=shlex.quote(self.workdir)), "/", "make the work directory")

    def _new_sdk_sandbox(self) -> Any:
        try:
            from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources
        except ImportError as exc:
            raise MissingDaytonaKey(NO_SDK) from exc

        o, cfg = self.options, self.config
        blocked = not cfg.network
        env = {name: os.environ[name] for name in cfg.pass_env if name in os.environ}
        env.update({str(k): str(v) for k, v in cfg.env.items()})
        common: dict[str, Any] = dict(
            name=None, language="python", env_vars=env, labels={OWNER_LABEL: "1", **cfg.labels, "rlm-agent": self.name},
            auto_stop_interval=o.auto_stop_minutes, ttl_minutes=o.ttl_minutes, public=False,
            network_block_all=blocked and not o.network_allow_list,
            network_allow_list=o.network_allow_list if blocked else None)
        if o.ephemeral:
            common["ephemeral"] = True
        else:
            common["auto_delete_interval"] = o.auto_delete_minutes
        if o.image:
            resources = Resources(cpu=o.cpu, memory=o.memory_gb, disk=o.disk_gb)
            params: Any = CreateSandboxFromImageParams(image=o.image, resources=resources, **common)
        else:
            params = CreateSandboxFromSnapshotParams(snapshot=o.snapshot, **common)
        daytona = client(o)
        try:
            return daytona.create(params, timeout=o.create_timeout_s)
        except Exception as exc:
            leaked = getattr(exc, "sandbox_id", None)  # made, but not started in time: do not leave it
            if leaked:
                _delete_quietly(daytona, leaked)
            raise SandboxStartError(f"Daytona could not create a sandbox: {exc}") from exc

    def _detach(self) -> Any:
        sdk, self.sdk = self.sdk, None
        return sdk

    def _release(self, sdk: Any) -> None:
        if sdk is not None:
            try:
                sdk.delete(timeout=60)
            except Exception as exc:
                if "not found" not in str(exc).lower():
                    log.warning("could not delete Daytona sandbox %s (%s); `python -m rlm_pipelines.sandbox "
                                "cleanup` deletes it, and its TTL ends it anyway", sdk.id, exc)
        _LIVE.discard(self)

    # -- commands and files

    def _require(self) -> Any:
        sdk = self.sdk
        if sdk is None:
            raise SandboxError(f"sandbox {self.id} is not started (or already stopped)")
        return sdk

    def _path(self, path: str) -> str:
        return posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(self.workdir, path))

    def run(self, cmd: Union[str, Sequence[str]], cwd: Optional[str] = None,
            timeout: Optional[float] = None) -> tuple[int, str]:
        command = cmd if isinstance(cmd, str) else shlex.join(cmd)
        limit = int(math.ceil(timeout)) if timeout else None
        started = time.monotonic()
        try:
            response = self._require().process.exec(command, cwd=self._path(cwd or "."), timeout=limit)
        except Exception as exc:
            if limit and time.monotonic() - started >= limit:
                return 124, f"[killed: the command ran past its {timeout:g} s limit]"
            raise SandboxError(f"command failed to run in Daytona sandbox {self.id}: {exc}") from exc
        code = response.exit_code if response.exit_code is not None else -1
        if limit and code in (-1, 124, 137) and time.monotonic() - started >= limit:
            code = 124
        return code, response.result or ""

    def _must(self, command: str, cwd: str, what: str, timeout: float = 120) -> str:
        code, out = self.run(command, cwd=cwd, timeout=timeout)
        if code != 0:
            raise SandboxStartError(f"could not {what} in Daytona sandbox {self.id}: {out.strip()[-500:]}")
        return out

    def upload(self, path: str, data: bytes) -> None:
        self._require().fs.upload_file(bytes(data), self._path(path))

    def download(self, path: str, max_bytes: Optional[int] = None, deadline: Optional[float] = None) -> bytes:
        """A regular file's bytes. Its type and size are asked first (a FIFO or an oversize file is never
        fetched), the fetch is abandoned at `deadline` (`TimeoutError`), and what came is checked against
        `max_bytes` again (`DownloadTooLarge`): sandbox code may swap the file in between."""
        target = self._path(path)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"downloading {path!r} ran past the run's deadline")
        code, out = self.run(f"stat -c '%F %s' -- {shlex.quote(target)}", timeout=max(1.0, min(left or 60, 60)))
        kind, _, size = out.strip().rpartition(" ")
        if code != 0:
            raise FileNotFoundError(f"{path} in Daytona sandbox {self.id}: {out.strip()[-300:]}")
        if kind not in ("regular file", "regular empty file"):
            raise SandboxError(f"cannot download {path!r}: not a regular file ({kind})")
        if max_bytes is not None and int(size or 0) > max_bytes:
            raise DownloadTooLarge(path, max_bytes)
        data = self._fetch(target, path, None if deadline is None else deadline - time.monotonic())
        if max_bytes is not None and len(data) > max_bytes:
            raise DownloadTooLarge(path, max_bytes)
        return data

    def _fetch(self, target: str, path: str, timeout: Optional[float]) -> bytes:
        """The SDK's download, given up after `timeout` s (its thread is left to finish on its own)."""
        box: dict[str, Any] = {}

        def fetch() -> None:
            try:
                box["data"] = self._require().fs.download_file(target)
            except Exception as exc:
                box["error"] = exc
        worker = threading.Thread(target=fetch, name=f"download-{self.id}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise TimeoutError(f"downloading {path!r} from Daytona sandbox {self.id} ran past the run's deadline")
        if "error" in box:
            raise FileNotFoundError(f"{path} in Daytona sandbox {self.id}: {box['error']}") from box["error"]
        return box["data"]

    def clone(self, url: str, path: str, branch: Optional[str] = None, commit: Optional[str] = None,
              bundle: Optional[Callable[[], Path]] = None) -> None:
        """Check out a repo at `path`, the way `daytona.checkout` says:

        clone   Daytona clones it (`git.clone`). That needs the network: where sandbox code must not have it,
                it is opened for the clone and blocked again before any model code runs, which takes runtime
                network changes (Daytona tiers 3 and 4).
        upload  `bundle()` (a git bundle the host made from its mirror) is uploaded and cloned from, with no
                network at all: any tier, private repos, local paths.
        auto    clone where that can work, else upload.
        """
        mode = self.options.checkout
        if mode == "auto" and url.startswith("file://") and bundle is not None:
            mode = "upload"  # a path on this machine: Daytona's cloud cannot reach it
        if mode in ("auto", "clone"):
            try:
                return self._clone(url, path, branch, commit)
            except _NetworkLocked as exc:
                if mode == "clone" or bundle is None:  # the account's tier decides: another try cannot help
                    raise SandboxConfigError(
                        f"Daytona refused to open sandbox {self.id}'s network for the clone ({exc}): set "
                        f"sandbox.daytona.checkout=upload (or auto), or sandbox.network=true") from exc
                log.info("sandbox %s cannot open its network for a clone (%s): uploading the repo", self.id, exc)
        if bundle is None:
            raise SandboxConfigError("sandbox.daytona.checkout=upload needs the repo as a bundle; none was given")
        self._checkout_bundle(bundle(), path, commit)

    def _clone(self, url: str, path: str, branch: Optional[str], commit: Optional[str]) -> None:
        sdk = self._require()
        locked = not self.config.network
        if locked:
            try:
                sdk.update_network_settings(network_block_all=False)
            except Exception as exc:
                raise _NetworkLocked(str(exc)) from exc
        try:
            sdk.git.clone(url, self._path(path), branch=branch, commit_id=commit)
        except Exception as exc:
            raise SandboxStartError(f"Daytona could not clone {url} into sandbox {self.id}: {exc}. Daytona "
                                    f"clones over the network: task.repo must be a URL it can reach, or set "
                                    f"sandbox.daytona.checkout=upload") from exc
        finally:
            if locked:  # fails closed: if this raises, the agent never starts and the sandbox is deleted
                if self.options.network_allow_list:
                    sdk.update_network_settings(network_allow_list=self.options.network_allow_list)
                else:
                    sdk.update_network_settings(network_block_all=True)

    def _checkout_bundle(self, bundle: Path, path: str, commit: Optional[str]) -> None:
        remote, target = f"{RLM_DIR}/repo.bundle", shlex.quote(self._path(path))
        self._require().fs.upload_file(str(bundle), remote)  # streamed from disk, not read into memory
        detach = f" && git -C {target} checkout --quiet --detach {shlex.quote(commit)}" if commit else ""
        self._must(f"git clone --quiet {remote} {target}{detach}; status=$?; rm -f {remote}; exit $status",
                   "/", "check out the uploaded repo", timeout=600)

    def fork(self, name: str) -> "DaytonaSandbox":
        """A started sandbox with this one's files (copy-on-write on Daytona's side): a prepared checkout
        without cloning again. It gets its own labels, and its network is blocked again where it must be."""
        sdk = self._require()
        child = DaytonaSandbox(self.config, name)
        try:
            child.sdk = sdk.fork(timeout=self.options.create_timeout_s)
        except Exception as exc:
            raise SandboxStartError(f"Daytona could not fork sandbox {self.id}: {exc}") from exc
        child.id, child._started = child.sdk.id, True
        _LIVE.add(child)
        try:
            child.sdk.set_labels({OWNER_LABEL: "1", **self.config.labels, "rlm-agent": name})
            if not self.config.network and not self.options.network_allow_list:
                child.sdk.update_network_settings(network_block_all=True)
        except Exception:
            child.stop()
            raise
        return child

    # -- the REPL

    def open_repl(self) -> ReplSession:
        self.start()
        sdk = self._require()
        with self._lock:
            if not self._server_ready:
                self.upload(f"{RLM_DIR}/server.py", SERVER_PATH.read_bytes())
                self._server_ready = True

        def spawn() -> HttpTransport:
            from daytona import SessionExecuteRequest

            port, secret = next(self._ports), secrets.token_urlsafe(32)
            secret_file, session_id = f"{RLM_DIR}/secret-{port}", f"rlm-repl-{port}"
            self.upload(secret_file, secret.encode())
            sdk.process.create_session(session_id)
            command = (f"cd {shlex.quote(self.workdir)} && exec {self.options.python} -I {RLM_DIR}/server.py "
                       f"--http {port} --secret-file {secret_file} "
                       f"--output-limit {self.config.repl.output_limit_chars} "
                       f"--max-frame-mb {self.config.repl.max_message_mb}")
            started = sdk.process.execute_session_command(
                session_id, SessionExecuteRequest(command=command, run_async=True))
            link = sdk.get_preview_link(port)
            headers = {"X-Daytona-Preview-Token": link.token, "X-Daytona-Skip-Preview-Warning": "true",
                       "X-Rlm-Secret": secret}
            return HttpTransport(link.url, headers, _ServerProcess(sdk, session_id, started.cmd_id),
                                 retry_s=self.options.gateway_retry_s)

        def stage(name: str, data: bytes) -> str:
            self.upload(f"{RLM_DIR}/{name}", data)
            return f"{RLM_DIR}/{name}"

        return self._keep_repl(ReplSession(spawn, self.config.repl, stage=stage))


class _NetworkLocked(Exception):
    """Daytona would not change a running sandbox's network (tiers 1 and 2 cannot)."""


class _ServerProcess:
    """The REPL server as Daytona sees it: a command in a session of its own."""

    def __init__(self, sdk: Any, session_id: str, command_id: str):
        self.sdk, self.session_id, self.command_id = sdk, session_id, command_id

    def alive(self) -> bool:
        try:
            return self.sdk.process.get_session_command(self.session_id, self.command_id).exit_code is None
        except Exception:  # session gone, sandbox gone
            return False

    def kill(self) -> None:
        self.sdk.process.delete_session(self.session_id)

    def exit_info(self) -> str:
        try:
            code = self.sdk.process.get_session_command(self.session_id, self.command_id).exit_code
            logs = self.sdk.process.get_session_command_logs(self.session_id, self.command_id)
        except Exception as exc:
            return f"state unknown: {exc}"
        tail = (logs.stderr or logs.output or "").strip()[-2000:]
        how = "still running" if code is None else f"exit code {code}"
        return how + (f"; stderr: {tail}" if tail else "")


def _delete_quietly(daytona: Any, sandbox_id: str) -> None:
    try:
        daytona.get(sandbox_id).delete(timeout=60)
    except Exception as exc:
        log.warning("could not delete Daytona sandbox %s: %s", sandbox_id, exc)


@atexit.register
def _delete_leftovers() -> None:
    """Sandboxes still up when the interpreter exits (an engine that did not reach its `finally`)."""
    for sandbox in list(_LIVE):
        sandbox.stop()
