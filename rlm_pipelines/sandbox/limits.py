"""Sandbox-wide limits of LocalSandbox: what rlimits cannot do, because they count per process or per file.

- `userns_filter()`: a seccomp program that refuses new user namespaces (with one, sandbox code could mount
  its own unbounded tmpfs or regain capabilities in it). On hosts where bwrap runs unprivileged it adds
  `--disable-userns` too; on a root host bwrap's own switch would map the sandbox to host root, so the filter
  is what holds there.
- `Watchdog`: a host thread that sums what all of a sandbox's processes hold (memory, processes) and what its
  workspace and /tmp hold on the host disk, and calls back when a sum is over its limit. It polls, so a
  sandbox may briefly go over by what it allocates or writes in one interval; rlimits stay as the
  per-process backstop.
"""

from __future__ import annotations

import os
import platform
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

# seccomp / classic BPF constants (linux/seccomp.h, linux/filter.h, linux/audit.h)
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K, _JGE_K = 0x20, 0x15, 0x45, 0x06, 0x35
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_NEWUSER = 0x10000000
_X32_BIT = 0x40000000
# machine -> (audit arch, clone, unshare, clone3); clone's and unshare's flags are their first argument
_SYSCALLS = {"x86_64": (0xC000003E, 56, 272, 435), "aarch64": (0xC00000B7, 220, 97, 435)}


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def userns_filter(machine: Optional[str] = None) -> Optional[bytes]:
    """The seccomp program (for bwrap's `--seccomp FD`): clone/unshare with CLONE_NEWUSER fail with EPERM;
    clone3, whose flags a filter cannot read, fails with ENOSYS (libc then falls back to clone); calls of
    another ABI (i386, x32) fail too. None on a machine it does not know."""
    known = _SYSCALLS.get(machine or platform.machine())
    if known is None:
        return None
    arch, clone, unshare, clone3 = known
    program = [
        _op(_LD_W_ABS, 4),                      # 0: arch
        _op(_JEQ_K, arch, 1, 0),                # 1: native ABI -> 3
        _op(_RET_K, _ERRNO | _ENOSYS),          # 2: another ABI: refused
        _op(_LD_W_ABS, 0),                      # 3: syscall number
        _op(_JGE_K, _X32_BIT, 6, 0),            # 4: x32 ABI -> 11 (refused)
        _op(_JEQ_K, clone3, 7, 0),              # 5: clone3 -> 13
        _op(_JEQ_K, clone, 1, 0),               # 6: clone -> 8
        _op(_JEQ_K, unshare, 0, 4),             # 7: unshare -> 8, anything else -> 12
        _op(_LD_W_ABS, 16),                     # 8: flags (first argument, low 32 bits)
        _op(_JSET_K, _CLONE_NEWUSER, 1, 0),     # 9: CLONE_NEWUSER -> 11
        _op(_RET_K, _ALLOW),                    # 10
        _op(_RET_K, _ERRNO | _EPERM),           # 11
        _op(_RET_K, _ALLOW),                    # 12
        _op(_RET_K, _ERRNO | _ENOSYS),          # 13
    ]
    return b"".join(program)


# -- measuring


def namespace_pids(inodes: set[int]) -> list[int]:
    """Host pids of every process in the PID namespaces with these inodes (all of a sandbox's processes,
    wherever sandbox code moved them: session, process group, double fork)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino in inodes:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def memory_bytes(pids: Iterable[int], shm_roots: Iterable[str]) -> int:
    """What these processes hold in host memory: their proportional share (PSS) of everything mapped, the
    pages of memfds they hold without mapping them, and the shared-memory tmpfs of each namespace
    (`/proc/<pid>/root/dev/shm`), whose pages are memory no process maps."""
    total, memfds = 0, set()
    for pid in pids:
        total += _pss(pid)
        for ident, size in _memfds(pid):
            if ident not in memfds:
                memfds.add(ident)
                total += size
    for root in shm_roots:
        try:
            stat = os.statvfs(root)
            total += (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        except OSError:
            pass
    return total


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _memfds(pid: int) -> list[tuple[tuple[int, int], int]]:
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        try:
            if os.readlink(path).startswith("/memfd:"):
                stat = os.stat(path)
                found.append(((stat.st_dev, stat.st_ino), stat.st_blocks * 512))
        except OSError:
            pass
    return found


def disk_files(dirs: Iterable[Path], shared_owner: Optional[int]) -> list[tuple[float, int, str]]:
    """(mtime, bytes, path) of everything the sandbox holds under these host dirs, each inode once. Files
    hardlinked from the host (a seeded checkout: several links, an owner other than the sandbox's uid
    `shared_owner`) take no new disk and are left out."""
    seen, files = set(), []
    for top in dirs:
        for folder, subdirs, names in os.walk(top):
            for name in names + subdirs:
                path = os.path.join(folder, name)
                try:
                    stat = os.lstat(path)
                except OSError:
                    continue
                if (stat.st_dev, stat.st_ino) in seen:
                    continue
                seen.add((stat.st_dev, stat.st_ino))
                if shared_owner is not None and stat.st_nlink > 1 and stat.st_uid != shared_owner:
                    continue
                files.append((stat.st_mtime, stat.st_blocks * 512, path))
    return files


# -- watching


class Watchdog:
    """Checks a sandbox's sums every `interval` seconds on a daemon thread and calls `over(kind, used)`
    (kind: memory, processes or disk) when one is over its limit. The disk walk costs more on a big
    checkout, so it runs at most every twenty times its own duration (at most ~5% of a core)."""

    def __init__(self, interval: float, limits: dict[str, int], pids: Callable[[], list[int]],
                 shm_roots: Callable[[], list[str]], disk: Callable[[], list[tuple[float, int, str]]],
                 over: Callable[[str, int], None]):
        self.interval, self.limits = interval, limits
        self._pids, self._shm_roots, self._disk, self._over = pids, shm_roots, disk, over
        self._stop = threading.Event()
        self._next_disk = 0.0
        self.peaks = {"memory": 0, "processes": 0, "disk": 0}
        self._thread = threading.Thread(target=self._loop, name="sandbox-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # a vanished /proc entry or folder mid-scan: next round
                continue

    def check(self) -> None:
        pids = self._pids()
        self._measure("processes", len(pids))
        if pids:
            self._measure("memory", memory_bytes(pids, self._shm_roots()))
        if time.monotonic() >= self._next_disk:
            began = time.monotonic()
            self._measure("disk", sum(size for _, size, _ in self._disk()))
            self._next_disk = time.monotonic() + max(self.interval, 20 * (time.monotonic() - began))

    def _measure(self, kind: str, used: int) -> None:
        self.peaks[kind] = max(self.peaks[kind], used)
        if used > self.limits[kind] and not self._stop.is_set():
            self._over(kind, used)
