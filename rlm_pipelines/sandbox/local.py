"""LocalSandbox: the embedded default. Every process runs under bubblewrap (`bwrap`).

What sandbox code sees: read-only system dirs (/usr and its links, a few /etc files) and the Python
install; its own workspace (read-write, `/workspace`) and private /tmp, both deleted at `stop()`; no network
unless configured; an empty environment except what the config names; its own PID, IPC and UTS
namespaces; rlimits on memory, CPU time, file size and process count. It dies with its parent.

When the host runs as root (containers, CI), the sandbox runs as a fresh unprivileged uid instead of a
user-namespaced root: the kernel never enforces RLIMIT_NPROC for uid 0 (even mapped), so that is what
makes the process limit - and fork-bomb containment - real.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import select
import signal
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.repl import SERVER_PATH
from rlm_pipelines.repl.session import ReplSession
from rlm_pipelines.repl.stdio import StdioTransport
from rlm_pipelines.sandbox.base import WORKSPACE, BaseSandbox, SandboxConfigError, SandboxError, SandboxStartError
from rlm_pipelines.text import clip_bytes

log = logging.getLogger(__name__)

# /etc entries programs need to run; nothing with secrets. resolv.conf/hosts only with network.
ETC_FILES = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
             "ssl", "ca-certificates", "mime.types")
ETC_NETWORK = ("resolv.conf", "hosts", "gai.conf")
OUTPUT_CAP = 8 * 1024 * 1024  # run() output kept in host memory, at most


class LocalSandbox(BaseSandbox):
    config_class = LocalSandboxConfig

    def __init__(self, config: Optional[LocalSandboxConfig] = None, name: str = "sbx",
                 mounts: Optional[dict[str, str]] = None):
        """`mounts`: host path -> path inside, bound read-only (e.g. a repo mirror to clone from)."""
        super().__init__(config or LocalSandboxConfig(), name)
        self.mounts = dict(mounts or {})
        self.isolation = _resolve_isolation(self.config.isolation)
        self.root: Optional[Path] = None
        self._uid: Optional[int] = None
        self._procs: set[subprocess.Popen] = set()

    @classmethod
    def describe(cls, config: LocalSandboxConfig) -> dict[str, str]:
        isolated = config.isolation == "bwrap" or (config.isolation == "auto" and _bwrap_problem() is None)
        return {"python": platform.python_version() if config.python is None else "3",
                "isolation": "bubblewrap" if isolated else "NOT isolated",
                "workdir": WORKSPACE if isolated else "the working directory"}

    @classmethod
    def check(cls, config: LocalSandboxConfig) -> None:
        _check_isolation(config.isolation)

    # -- lifecycle

    def _create(self) -> None:
        base = self.config.root_dir or None
        if base:
            os.makedirs(base, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"rlm-{self.id}-", dir=base))
        for sub in ("workspace", "tmp", "etc"):
            (root / sub).mkdir(mode=0o700)
        if self.isolation == "none":
            self.workdir = str(root / "workspace")
        elif os.geteuid() == 0:
            self._uid = random.randint(200_000, 1_200_000)
            for sub in ("workspace", "tmp"):
                os.chown(root / sub, self._uid, self._uid)
        user = self._uid if self._uid is not None else os.getuid()
        (root / "etc" / "passwd").write_text(f"root:x:0:0::/root:/bin/sh\nsandbox:x:{user}:{user}::"
                                             f"{WORKSPACE}:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
        (root / "etc" / "group").write_text(f"root:x:0:\nsandbox:x:{user}:\nnogroup:x:65534:\n")
        # read-only mounts (a repo mirror) belong to the host's user: let git inside use them
        (root / "etc" / "gitconfig").write_text("[safe]\n\tdirectory = *\n")
        self.root = root

    def _detach(self) -> tuple[set[subprocess.Popen], Optional[Path]]:
        procs, self._procs = set(self._procs), set()
        root, self.root = self.root, None
        return procs, root

    def _release(self, resources: tuple[set[subprocess.Popen], Optional[Path]]) -> None:
        procs, root = resources
        for proc in procs:
            _kill(proc)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    # -- processes

    def _argv(self, command: Sequence[str], cwd: Optional[str] = None, info_fd: Optional[int] = None) -> list[str]:
        """The full host command line that runs `command` inside this sandbox."""
        cfg, root = self.config, self._require_root()
        nproc = cfg.max_processes if os.geteuid() == 0 else _user_processes() + cfg.max_processes
        argv = ["prlimit", f"--as={cfg.memory_mb << 20}", f"--cpu={cfg.cpu_seconds}",
                f"--fsize={cfg.file_size_mb << 20}", f"--nproc={nproc}", "--core=0", "--"]
        env = _environment(cfg, self.workdir, self._tmpdir())
        if self.isolation == "none":
            return argv + ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
        argv += ["bwrap", "--info-fd", str(info_fd), "--die-with-parent", "--new-session", "--unshare-ipc",
                 "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--clearenv"]
        if not cfg.network:
            argv.append("--unshare-net")
        if self._uid is None:  # unprivileged host: a user namespace maps our own uid
            argv.append("--unshare-user")
        else:  # root host: drop to the sandbox's own uid (see the module docstring)
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        argv += _system_mounts(cfg.network)
        # The sandbox's own /workspace and /tmp first: the Python install is bound after them, so an
        # interpreter that lives under /tmp (a CI venv) stays visible instead of hidden by the private /tmp.
        argv += ["--bind", str(root / "workspace"), WORKSPACE, "--bind", str(root / "tmp"), "/tmp"]
        for prefix in sorted({sys.base_prefix, sys.prefix, str(Path(self._python()).resolve().parent.parent)}):
            argv += ["--ro-bind", prefix, prefix]
        argv += ["--perms", "0755", "--dir", "/.rlm", "--ro-bind", str(SERVER_PATH), "/.rlm/server.py",
                 "--ro-bind", str(root / "etc" / "passwd"), "/etc/passwd",
                 "--ro-bind", str(root / "etc" / "group"), "/etc/group",
                 "--ro-bind", str(root / "etc" / "gitconfig"), "/etc/gitconfig",
                 "--proc", "/proc", "--dev", "/dev", "--chdir", os.path.normpath(os.path.join(WORKSPACE, cwd or "."))]
        for host, inside in self.mounts.items():
            argv += ["--ro-bind", host, inside]
        for key, value in env.items():
            argv += ["--setenv", key, value]
        argv.append("--")
        if self._uid is not None:
            argv += ["setpriv", f"--reuid={self._uid}", f"--regid={self._uid}", "--clear-groups", "--"]
        return argv + list(command)

    def _popen(self, command: Sequence[str], cwd: Optional[str] = None, pass_fds: tuple[int, ...] = (),
               **kwargs) -> subprocess.Popen:
        host_cwd = self._host_path(cwd or ".") if self.isolation == "none" else None
        # bwrap tells the host pid of the namespace's first process on this pipe: `_kill` waits for it,
        # so that "stopped" means every process in the namespace is gone, not just bwrap.
        info_r, info_w = os.pipe() if self.isolation == "bwrap" else (None, None)
        try:
            proc = subprocess.Popen(self._argv(command, cwd, info_w), cwd=host_cwd,
                                    pass_fds=pass_fds + ((info_w,) if info_w is not None else ()),
                                    start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        except OSError as exc:
            if info_r is not None:
                os.close(info_r)
            raise SandboxStartError(f"cannot start a process in sandbox {self.id}: {exc}") from exc
        finally:
            if info_w is not None:
                os.close(info_w)
        proc.info_fd = info_r  # type: ignore[attr-defined]
        with self._lock:
            if self._stopped:
                _kill(proc)
                raise SandboxError(f"sandbox {self.id} was stopped")
            self._procs.add(proc)
        return proc

    def run(self, cmd: Union[str, Sequence[str]], cwd: Optional[str] = None,
            timeout: Optional[float] = None) -> tuple[int, str]:
        command = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        proc = self._popen(command, cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, code = proc.communicate()[0] or b"", 124  # what it printed before the limit is kept
            out += f"\n[killed: the command ran past its {timeout:g} s limit]".encode()
        finally:
            _kill(proc)  # background children of the command die with it, as in a fresh shell's exit
            with self._lock:
                self._procs.discard(proc)
        return code, clip_bytes(out, OUTPUT_CAP).decode(errors="replace")

    def open_repl(self) -> ReplSession:
        self.start()
        server = str(SERVER_PATH) if self.isolation == "none" else "/.rlm/server.py"
        args = ["--output-limit", str(self.config.repl.output_limit_chars)]

        def spawn() -> StdioTransport:
            def start(server_args: list[str], fds: tuple[int, int]) -> subprocess.Popen:
                return self._popen([self._python(), "-I", server, *server_args], pass_fds=fds,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return StdioTransport(start, args, kill=_kill)

        def stage(name: str, data: bytes) -> str:
            path = f"{self._tmpdir()}/{name}"
            self.upload(path, data)
            return path

        return self._keep_repl(ReplSession(spawn, self.config.repl, stage=stage))

    # -- files (through the host's view of the workspace, so no process is started)

    def seed(self, base: Path, path: str) -> bool:
        """Make `path` (inside) a hardlinked copy of `base` (a host folder) in milliseconds, whatever its size: the
        directories are the sandbox's own, the files are shared read-only (changing one means replacing it,
        which leaves the shared copy alone). Only where the sandbox runs as a uid of its own; returns False
        where it cannot (then copy the slow way)."""
        if self._uid is None:  # same uid as the host user: shared files would be writable in place
            return False
        target = self._host_path(path)
        done = subprocess.run(["cp", "-al", str(base), str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            return False
        for folder, _, _ in os.walk(target):
            os.chown(folder, self._uid, self._uid)
        return True

    def upload(self, path: str, data: bytes) -> None:
        target = self._host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if self._uid is not None:
            for node in [target, *target.parents]:
                if node == self.root:
                    break
                os.chown(node, self._uid, self._uid)

    def download(self, path: str) -> bytes:
        fd = os.open(self._host_path(path), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def _host_path(self, path: str) -> Path:
        """Map a sandbox path to the host, refusing anything (symlinks included) that leaves the sandbox."""
        root = self._require_root()
        mounts = {self.workdir: root / "workspace", self._tmpdir(): root / "tmp"}
        full = path if os.path.isabs(path) else os.path.join(self.workdir, path)
        full = os.path.normpath(full)
        for inside, host in mounts.items():
            if full == inside or full.startswith(inside + "/"):
                target = (host / os.path.relpath(full, inside)).resolve()
                if target == host.resolve() or host.resolve() in target.parents:
                    return target
        raise SandboxError(f"path {path!r} is outside the sandbox's {self.workdir} and {self._tmpdir()}")

    def _require_root(self) -> Path:
        if self.root is None:
            raise SandboxError(f"sandbox {self.id} is not started (or already stopped)")
        return self.root

    def _tmpdir(self) -> str:
        return str(self._require_root() / "tmp") if self.isolation == "none" else "/tmp"

    def _python(self) -> str:
        return self.config.python or sys.executable


def _environment(cfg: LocalSandboxConfig, workdir: str, tmpdir: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8",
           "GIT_AUTHOR_NAME": "rlm-agent", "GIT_AUTHOR_EMAIL": "agent@rlm.invalid",
           "GIT_COMMITTER_NAME": "rlm-agent", "GIT_COMMITTER_EMAIL": "agent@rlm.invalid"}
    env.update({name: os.environ[name] for name in cfg.pass_env if name in os.environ})
    env.update({str(k): str(v) for k, v in cfg.env.items()})
    return env


def _system_mounts(network: bool) -> list[str]:
    # Directories bwrap makes for single-file binds are root-only unless told otherwise.
    argv = ["--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), str(path)]
    for name in ETC_FILES + (ETC_NETWORK if network else ()):
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return argv


def _user_processes() -> int:
    """Processes and threads of our uid: RLIMIT_NPROC counts them all, so the limit is on top of them."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                pass
    return count


def _kill(proc: subprocess.Popen) -> None:
    """Kill a sandbox process and everything in its namespace, and wait until they are all gone
    (idempotent)."""
    info_fd = getattr(proc, "info_fd", None)
    pidfd = None
    if info_fd is not None:
        proc.info_fd = None  # type: ignore[attr-defined]
        try:
            os.set_blocking(info_fd, False)
            info = json.loads(os.read(info_fd, 4096) or b"{}")
            pidfd = os.pidfd_open(info["child-pid"]) if "child-pid" in info else None
        except (OSError, ValueError, KeyError):
            pass
        finally:
            os.close(info_fd)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if pidfd is not None:  # the namespace's init exits only after the kernel has reaped all the rest
        select.select([pidfd], [], [], 10)
        os.close(pidfd)


@lru_cache(maxsize=None)
def _bwrap_problem() -> Optional[str]:
    """None when bubblewrap can make a sandbox on this host, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    if shutil.which("prlimit") is None:
        return "prlimit is not installed (apt-get install util-linux)"
    probe = ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--dev", "/dev", "true"]
    if os.geteuid() != 0:
        probe.insert(1, "--unshare-user")
    result = subprocess.run(probe, capture_output=True, text=True)
    return None if result.returncode == 0 else f"bwrap cannot create namespaces here: {result.stderr.strip()}"


def _check_isolation(isolation: str) -> None:
    """Raise `SandboxConfigError` for an isolation this host can never give."""
    if isolation not in ("auto", "bwrap", "none"):
        raise SandboxConfigError(f"sandbox.isolation must be auto, bwrap or none, not {isolation!r}")
    if isolation == "bwrap" and _bwrap_problem():
        raise SandboxConfigError(f"sandbox.isolation=bwrap but {_bwrap_problem()}")


def _resolve_isolation(isolation: str) -> str:
    _check_isolation(isolation)
    if isolation != "auto":
        return isolation
    problem = _bwrap_problem()
    if problem is None:
        return "bwrap"
    message = (f"SANDBOX NOT ISOLATED: {problem}. Model-written code will run as a plain subprocess that can "
               f"read your files and reach the network. Install bubblewrap, or set sandbox.isolation=none to "
               f"accept this knowingly.")
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return "none"
