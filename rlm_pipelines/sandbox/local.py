"""LocalSandbox: the embedded default. Every process runs under bubblewrap (`bwrap`).

What sandbox code sees: read-only system dirs (/usr and its links, a few /etc files) and the Python
install; its own workspace (read-write, `/workspace`) and private /tmp, both deleted at `stop()`; no network
unless configured; an empty environment except what the config names; its own PID, IPC and UTS
namespaces; no new user namespaces (so no mounts of its own); a size-capped /dev/shm. It dies with its
parent.

Limits bound the whole sandbox, not one process: a watchdog thread (`limits.py`) sums the memory and
processes of every process in the sandbox's PID namespaces and the bytes in its workspace and /tmp, and
stops all of its processes when a sum is over (`memory_mb`, `max_processes`, `disk_mb`); the files written
last go too when the disk is over. rlimits on memory, CPU time, file size and process count stay as the
per-process backstop between the watchdog's checks.

When the host runs as root (containers, CI), the sandbox runs as a fresh unprivileged uid instead of a
user-namespaced root: the kernel never enforces RLIMIT_NPROC for uid 0 (even mapped), so that is what
makes the process limit - and fork-bomb containment - real.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import importlib.util
import json
import logging
import marshal
import os
import platform
import select
import random
import signal
import stat
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.repl import SERVER_PATH
from rlm_pipelines.repl.session import ReplSession
from rlm_pipelines.repl.stdio import StdioTransport
from rlm_pipelines.sandbox import limits
from rlm_pipelines.sandbox.base import (WORKSPACE, BaseSandbox, DownloadTooLarge, SandboxConfigError, SandboxError,
                                        SandboxStartError)
from rlm_pipelines.sandbox.owner import write_owner
from rlm_pipelines.text import clip_bytes

log = logging.getLogger(__name__)

# /etc entries programs need to run; nothing with secrets. resolv.conf/hosts only with network.
ETC_FILES = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
             "ssl", "ca-certificates", "mime.types")
ETC_NETWORK = ("resolv.conf", "hosts", "gai.conf")
OUTPUT_CAP = 8 * 1024 * 1024  # run() output kept in host memory, at most
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


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
        self._watchdog: Optional[limits.Watchdog] = None
        self._unwatched: Optional[limits.Watchdog] = None  # made, not yet started: no process yet
        self._frozen = False  # host_view() stopped its processes for good

    @classmethod
    def describe(cls, config: LocalSandboxConfig) -> dict[str, str]:
        isolated = config.isolation == "bwrap" or (config.isolation == "auto" and _bwrap_problem() is None)
        whole = (f"all its processes together may use at most {config.memory_mb} MB of memory and "
                 f"{config.max_processes} processes and threads") if isolated else \
            f"each process may use at most {config.memory_mb} MB of memory"
        return {"python": platform.python_version() if config.python is None else "3",
                "isolation": "bubblewrap" if isolated else "NOT isolated",
                "workdir": WORKSPACE if isolated else "the working directory",
                "limits": f"Limits: {whole}; files under the working directory and /tmp may hold at most "
                          f"{config.disk_mb} MB together (one file at most {min(config.file_size_mb, config.disk_mb)}"
                          f" MB). Going over stops every process in the sandbox (REPL state is lost) and, for "
                          f"the disk, removes the files written last; you are told when that happens."}

    @classmethod
    def check(cls, config: LocalSandboxConfig) -> None:
        _check_isolation(config.isolation)
        _check_python(config.python)

    # -- lifecycle

    def _create(self) -> None:
        _check_python(self.config.python)
        base = self.config.root_dir or None
        if base:
            os.makedirs(base, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"rlm-{self.id}-", dir=base))
        write_owner(root)  # who made it: `python -m rlm_pipelines.sandbox cleanup --local` spares live ones
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
        if self.config.python is None:  # our own interpreter: it can run our compiled server (see open_repl)
            inside = str(SERVER_PATH) if self.isolation == "none" else "/.rlm/server.py"
            (root / "etc" / "server.pyc").write_bytes(_compiled_server(inside, SERVER_PATH.stat().st_mtime_ns))
        program = _userns_filter()
        if program is not None:
            (root / "etc" / "seccomp.bpf").write_bytes(program)
        self.root = root
        self._watchdog = self._unwatched = self._new_watchdog(root)  # started with the first process (_popen)

    def _detach(self) -> tuple[set[subprocess.Popen], Optional[Path], Optional[limits.Watchdog]]:
        procs, self._procs = set(self._procs), set()
        root, self.root = self.root, None
        watchdog, self._watchdog, self._unwatched = self._watchdog, None, None
        return procs, root, watchdog

    def _release(self, resources: tuple[set[subprocess.Popen], Optional[Path], Optional[limits.Watchdog]]) -> None:
        procs, root, watchdog = resources
        if watchdog is not None:
            watchdog.stop()
        for proc in procs:
            _kill(proc)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    # -- sandbox-wide limits (see limits.py)

    def _new_watchdog(self, root: Path) -> limits.Watchdog:
        cfg = self.config
        caps = {"memory": cfg.memory_mb << 20, "processes": cfg.max_processes, "disk": cfg.disk_mb << 20}
        return limits.Watchdog(cfg.watch_interval_s, caps, pids=self._sandbox_pids,
                               shm_roots=lambda: [f"/proc/{pid}/root/dev/shm" for pid in self._inits()],
                               disk=lambda: limits.disk_files([root / "workspace", root / "tmp"], self._uid),
                               over=self._over_limit)

    def _inits(self) -> list[int]:
        """Host pids of the first process of each of the sandbox's live PID namespaces."""
        with self._lock:
            procs = list(self._procs)
        return [pid for pid in map(_child_pid, procs) if pid is not None]

    def _sandbox_pids(self) -> list[int]:
        """Every process in the sandbox, wherever it went: all members of its PID namespaces."""
        if self.isolation != "bwrap":
            return []
        inodes = set()
        for pid in self._inits():
            try:
                inodes.add(os.stat(f"/proc/{pid}/ns/pid").st_ino)
            except OSError:
                pass
        return limits.namespace_pids(inodes) if inodes else []

    def _over_limit(self, kind: str, used: int) -> None:
        """Stop every process of the sandbox (and, for the disk, remove the files written last until it is
        back under), and leave a notice for whoever runs code in it next."""
        cfg = self.config
        limit = {"memory": f"{cfg.memory_mb} MB", "processes": f"{cfg.max_processes}",
                 "disk": f"{cfg.disk_mb} MB"}[kind]
        shown = f"{used >> 20} MB" if kind != "processes" else f"{used}"
        notice = f"the sandbox went over its {kind} limit ({limit}; it reached {shown}) and its processes were stopped"
        log.warning("sandbox %s: %s", self.id, notice)
        with self._enforcing:  # whoever sees a process die and asks why waits for the whole story
            self._note(notice)
            self._kill_all()
            removed = self._trim_disk(cfg.disk_mb << 20) if kind == "disk" else []
            if removed:
                self._note(f"the files written last were removed to bring it back under its disk limit: "
                           f"{', '.join(removed)}")

    def _kill_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for pid in self._sandbox_pids():
            _signal(pid)
        for proc in procs:
            _signal(-proc.pid)
        deadline = time.monotonic() + 5
        while self._sandbox_pids() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _trim_disk(self, cap: int) -> list[str]:
        """Remove files, newest first, until the workspace and /tmp hold at most `cap` bytes; their paths
        inside. Runs with every sandbox process dead, so nothing swaps a folder for a symlink meanwhile."""
        root = self.root
        if root is None:
            return []
        files = limits.disk_files([root / "workspace", root / "tmp"], self._uid)
        total, removed = sum(size for _, size, _ in files), []
        for _, size, path in sorted(files, reverse=True):
            if total <= cap:
                break
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                os.unlink(path)
            except OSError:
                continue
            total -= size
            removed.append(self._inside_path(path))
        return removed

    def _inside_path(self, host: str) -> str:
        root = self._require_root()
        for sub, inside in (("workspace", self.workdir), ("tmp", self._tmpdir())):
            base = str(root / sub)
            if host.startswith(base + "/"):
                return inside + host[len(base):]
        return host

    # -- processes

    def _rlimits(self) -> dict[str, int]:
        """The per-process limits every sandbox process starts under, by prlimit's names."""
        cfg = self.config
        nproc = cfg.max_processes if os.geteuid() == 0 else _user_processes() + cfg.max_processes
        return {"as": cfg.memory_mb << 20, "cpu": cfg.cpu_seconds, "fsize": min(cfg.file_size_mb, cfg.disk_mb) << 20,
                "nproc": nproc, "core": 0}

    def _argv(self, command: Sequence[str], cwd: Optional[str] = None, info_fd: Optional[int] = None,
              seccomp_fd: Optional[int] = None, prlimit: bool = True) -> list[str]:
        """The full host command line that runs `command` inside this sandbox (`seccomp_fd`: the
        `limits.userns_filter` program to read). Without `prlimit` the command sets `_rlimits()` itself
        before it runs anything of the sandbox's (the REPL server does: one process fewer to start)."""
        cfg, root = self.config, self._require_root()
        argv = [_program("prlimit"), *(f"--{name}={value}" for name, value in self._rlimits().items()), "--"] \
            if prlimit else []
        env = _environment(cfg, self.workdir, self._tmpdir())
        if self.isolation == "none":
            return argv + [_program("env"), "-i", *(f"{k}={v}" for k, v in env.items()), *command]
        argv += [_program("bwrap"), "--info-fd", str(info_fd), "--die-with-parent", "--new-session",
                 "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
                 "--clearenv"]
        if not cfg.network:
            argv.append("--unshare-net")
        if self._uid is None:  # unprivileged host: a user namespace maps our own uid, and no more are made in it
            argv += ["--unshare-user", "--disable-userns"]
        else:  # root host: drop to the sandbox's own uid (see the module docstring)
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        if seccomp_fd is not None:  # no new user namespaces, on root hosts too (see limits.userns_filter)
            argv += ["--seccomp", str(seccomp_fd)]
        argv += _system_mounts(cfg.network)
        # The sandbox's own /workspace and /tmp first: the Python install is bound after them, so an
        # interpreter that lives under /tmp (a CI venv) stays visible instead of hidden by the private /tmp.
        argv += ["--bind", str(root / "workspace"), WORKSPACE, "--bind", str(root / "tmp"), "/tmp"]
        python = Path(self._python())
        venv = python.parent.parent  # a configured venv's own folder (its pyvenv.cfg), besides its base install
        prefixes = {sys.base_prefix, sys.prefix, str(python.resolve().parent.parent)}
        for prefix in sorted(prefixes | ({str(venv)} if (venv / "pyvenv.cfg").is_file() else set())):
            if prefix != "/usr" and not prefix.startswith("/usr/"):  # /usr is bound already; each mount costs
                argv += [*_open_folders(prefix, "/tmp"), "--ro-bind", prefix, prefix]
        argv += ["--perms", "0755", "--dir", "/.rlm", "--ro-bind", str(SERVER_PATH), "/.rlm/server.py",
                 "--ro-bind-try", str(root / "etc" / "server.pyc"), "/.rlm/server.pyc",
                 "--ro-bind", str(root / "etc" / "passwd"), "/etc/passwd",
                 "--ro-bind", str(root / "etc" / "group"), "/etc/group",
                 "--ro-bind", str(root / "etc" / "gitconfig"), "/etc/gitconfig",
                 "--proc", "/proc", "--dev", "/dev", "--size", str(cfg.memory_mb << 20), "--tmpfs", "/dev/shm",
                 "--chdir", os.path.normpath(os.path.join(WORKSPACE, cwd or "."))]
        for host, inside in self.mounts.items():
            argv += ["--ro-bind", host, inside]
        for key, value in env.items():
            argv += ["--setenv", key, value]
        argv.append("--")
        if self._uid is not None:
            argv += [_program("setpriv", SANDBOX_PATH), f"--reuid={self._uid}", f"--regid={self._uid}",
                     "--clear-groups", "--"]
        return argv + list(command)

    def _popen(self, command: Sequence[str], cwd: Optional[str] = None, pass_fds: tuple[int, ...] = (),
               prlimit: bool = True, **kwargs) -> subprocess.Popen:
        host_cwd = self._host_path(cwd or ".") if self.isolation == "none" else None
        # bwrap tells the host pid of the namespace's first process on this pipe: `_kill` waits for it,
        # so that "stopped" means every process in the namespace is gone, not just bwrap.
        info_r, info_w = os.pipe() if self.isolation == "bwrap" else (None, None)
        seccomp = self._open_seccomp()
        extra = tuple(fd for fd in (info_w, seccomp) if fd is not None)
        try:
            proc = _spawn(self._argv(command, cwd, info_w, seccomp, prlimit), cwd=host_cwd,
                          pass_fds=pass_fds + extra, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        except OSError as exc:
            if info_r is not None:
                os.close(info_r)
            raise SandboxStartError(f"cannot start a process in sandbox {self.id}: {exc}") from exc
        finally:
            for fd in extra:
                os.close(fd)
        proc.info_fd = info_r  # type: ignore[attr-defined]
        with self._lock:
            if self._stopped or self._frozen:
                _kill(proc)
                raise SandboxError(f"sandbox {self.id} was stopped")
            self._procs.add(proc)
            watchdog, self._unwatched = self._unwatched, None
        if watchdog is not None:  # starting a thread waits for it to run: meanwhile the process sets up
            watchdog.start()
        return proc

    def _open_seccomp(self) -> Optional[int]:
        path = self._require_root() / "etc" / "seccomp.bpf"
        if self.isolation != "bwrap" or not path.exists():
            return None
        return os.open(path, os.O_RDONLY)

    def run(self, cmd: Union[str, Sequence[str]], cwd: Optional[str] = None,
            timeout: Optional[float] = None) -> tuple[int, str]:
        command = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        notices = self._notice_reader()
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
        notice = notices()
        if notice:
            out += f"\n[{notice}]".encode()
        return code, clip_bytes(out, OUTPUT_CAP).decode(errors="replace")

    def open_repl(self) -> ReplSession:
        self.start()
        server = str(SERVER_PATH) if self.isolation == "none" else "/.rlm/server.py"
        if (self._require_root() / "etc" / "server.pyc").exists():
            server = str(self._require_root() / "etc" / "server.pyc") if self.isolation == "none" else \
                "/.rlm/server.pyc"
        args = ["--output-limit", str(self.config.repl.output_limit_chars),
                "--max-frame-mb", str(self.config.repl.max_message_mb)]

        def spawn() -> StdioTransport:
            def start(server_args: list[str], fds: tuple[int, int]) -> subprocess.Popen:
                limits = ",".join(f"{name}={value}" for name, value in self._rlimits().items())
                return self._popen([self._python(), "-I", server, "--rlimits", limits, *server_args], pass_fds=fds,
                                   prlimit=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
            os.chown(folder, self._uid, self._uid, follow_symlinks=False)
        return True

    def upload(self, path: str, data: bytes) -> None:
        """Write a file (and its missing folders) as the sandbox's own. Sandbox code may swap any folder or
        the file for a symlink meanwhile, so no path is resolved twice (see `_parent`), and owners are set
        on the open descriptors."""
        try:
            folder, name = self._parent(path, "upload to", make=True)
        except OSError as exc:
            raise SandboxError(f"cannot upload to {path!r}: {exc}") from exc
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644, dir_fd=folder)
        except OSError as exc:
            raise SandboxError(f"cannot upload to {path!r}: {exc}") from exc
        finally:
            os.close(folder)
        with os.fdopen(fd, "wb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a FIFO, or a hardlink to someone's file
                raise SandboxError(f"cannot upload to {path!r}: not a plain file of the sandbox's own")
            os.set_blocking(fd, True)
            os.ftruncate(fd, 0)
            handle.write(data)
            self._own(fd)

    def _parent(self, path: str, verb: str, make: bool) -> tuple[int, str]:
        """(an open descriptor of the folder `path` is in, the file's name): each folder is opened relative
        to the one before it, never through a symlink (made, as the sandbox's own, when `make`)."""
        mount, parts = self._inside_parts(path)
        if not parts:
            raise SandboxError(f"cannot {verb} {path!r}: it is a folder")
        folder = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        for name in parts[:-1]:
            try:
                if make:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=folder)
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SandboxError(f"cannot {verb} {path!r}: {name!r} is not a folder") from exc
                raise
            finally:
                os.close(folder)
            folder = inner
            if make:
                self._own(folder)
        return folder, parts[-1]

    def _own(self, fd: int) -> None:
        if self._uid is not None:
            os.fchown(fd, self._uid, self._uid)

    def _inside_parts(self, path: str) -> tuple[Path, list[str]]:
        """The host folder of the mount `path` (inside) is in, and the names below it (no `..`)."""
        inside, host, full = self._mount_of(path)
        rest = os.path.relpath(full, inside)
        return host, [] if rest == "." else rest.split("/")

    def _mount_of(self, path: str) -> tuple[str, Path, str]:
        """(the writable mount `path` (inside) is under, its host folder, the normalised inside path)."""
        root = self._require_root()
        full = os.path.normpath(path if os.path.isabs(path) else os.path.join(self.workdir, path))
        for inside, host in ((self.workdir, root / "workspace"), (self._tmpdir(), root / "tmp")):
            if full == inside or full.startswith(inside + "/"):
                return inside, host, full
        raise SandboxError(f"path {path!r} is outside the sandbox's {self.workdir} and {self._tmpdir()}")

    def download(self, path: str, max_bytes: Optional[int] = None, deadline: Optional[float] = None) -> bytes:
        """Read a regular file of the sandbox's. Sandbox code may swap it (or a folder on its way) for a
        symlink, a FIFO or a huge file meanwhile: folders are opened as `_parent` does, the file
        non-blocking, its type checked on the open descriptor, and reading stops at `max_bytes`
        (`DownloadTooLarge`) and at `deadline` (`TimeoutError`)."""
        folder, name = self._parent(path, "download", make=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=folder)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SandboxError(f"cannot download {path!r}: a symlink on its way") from exc
            raise
        finally:
            os.close(folder)
        with os.fdopen(fd, "rb", buffering=0) as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxError(f"cannot download {path!r}: not a regular file")
            return _read_capped(handle, path, max_bytes, deadline)

    def host_view(self, path: str) -> Path:
        """Stop every process of the sandbox for good (see `SupportsHostView`) and return the host folder of
        `path`: nothing inside can change it while the host reads it."""
        with self._lock:
            self._frozen = True
            procs = list(self._procs)
        for proc in procs:
            _kill(proc)  # waits until every process of its PID namespace is gone
        return self._host_path(path)

    def _host_path(self, path: str) -> Path:
        """Map a sandbox path to the host, refusing anything (symlinks included) that leaves the sandbox."""
        inside, host, full = self._mount_of(path)
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


_userns_filter = lru_cache(maxsize=None)(limits.userns_filter)  # the same program for every sandbox


@lru_cache(maxsize=None)
def _program(name: str, path: Optional[str] = None) -> str:
    """The full path of a program on `path` (the host's PATH by default), looked up once: each start would
    otherwise try every folder of PATH in turn (milliseconds with long PATHs)."""
    return shutil.which(name, path=path) or name


@lru_cache(maxsize=4)
def _compiled_server(inside: str, mtime_ns: int) -> bytes:
    """server.py compiled for this interpreter (a .pyc that names `inside` as its source). Python compiles a
    script it runs on every start, never caching it: 8 ms of each REPL start for server.py. A .pyc runs as
    a script as well; it is written on the host and bound read-only, so sandbox code cannot change it."""
    source = SERVER_PATH.read_bytes()
    code = compile(source, inside, "exec", dont_inherit=True)
    header = importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little") + importlib.util.source_hash(source)
    return header + marshal.dumps(code)


def _environment(cfg: LocalSandboxConfig, workdir: str, tmpdir: str) -> dict[str, str]:
    env = {"PATH": SANDBOX_PATH, "HOME": workdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8",
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


def _open_folders(path: str, under: str) -> list[str]:
    """bwrap arguments making the folders between `under` and `path` (a mount point in the sandbox's own
    /tmp) enterable: bwrap would make them with the host's modes, e.g. pytest's 0700 temp folders."""
    argv: list[str] = []
    parent = Path(path).parent
    if parent != Path(under) and Path(under) in parent.parents:
        argv += _open_folders(str(parent), under)
        argv += ["--perms", "0755", "--dir", str(parent)]
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


_info_lock = threading.Lock()


def _child_pid(proc: subprocess.Popen) -> Optional[int]:
    """The host pid of the first process in a bwrap's PID namespace, from its info fd (read once, when
    bwrap has written it; None until then or without one)."""
    with _info_lock:
        info_fd = getattr(proc, "info_fd", None)
        if info_fd is not None:
            try:
                os.set_blocking(info_fd, False)
                data = os.read(info_fd, 4096)
                proc.child_pid = json.loads(data).get("child-pid") if data else None  # type: ignore[attr-defined]
            except BlockingIOError:
                return None
            except (OSError, ValueError, AttributeError):
                proc.child_pid = None  # type: ignore[attr-defined]
            proc.info_fd = None  # type: ignore[attr-defined]
            os.close(info_fd)
        return getattr(proc, "child_pid", None)


def _read_capped(handle, path: str, max_bytes: Optional[int], deadline: Optional[float]) -> bytes:
    """At most `max_bytes` of a regular file, in chunks, watching the deadline between them."""
    limit = max_bytes if max_bytes is not None else sys.maxsize
    chunks, size = [], 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"downloading {path!r} ran past the run's deadline")
        chunk = handle.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise DownloadTooLarge(path, limit)
        chunks.append(chunk)


def _signal(pid: int) -> None:
    """SIGKILL a process (a negative pid: a process group), if it is still there."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# bwrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the THREAD that started it ends, not the process:
# a sandbox first used from a short-lived thread (a Prefect task, a caller's worker) would die with that
# thread. Every sandbox process is therefore started from this one thread, which lives as long as we do.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlm-sandbox-spawn")


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    return _SPAWNER.submit(subprocess.Popen, argv, **kwargs).result()


def _kill(proc: subprocess.Popen) -> None:
    """Kill a sandbox process and everything in its namespace, and wait until they are all gone
    (idempotent)."""
    child = _child_pid(proc)
    pidfd = None
    if child is not None:
        try:
            pidfd = os.pidfd_open(child)
        except OSError:
            pass
    _signal(-proc.pid)
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


def _check_python(python: Optional[str]) -> None:
    """Raise `SandboxConfigError` when the configured interpreter cannot run: every start would fail."""
    if python is not None and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SandboxConfigError(f"sandbox.python={python!r} is not an executable file on this host")


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
