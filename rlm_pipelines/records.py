"""Writing a run's records so that every way a run ends leaves them readable and final.

- Records are written whole or not at all (a temp file renamed over the old one), as valid UTF-8 (lone
  surrogates from a model become U+FFFD), and a full disk keeps the last good record and leaves no temp file.
- A run folder belongs to one run: `claim_folder` creates its `run.json` exclusively, so a second run into
  the same folder is refused instead of overwriting the first one's records.
- A run records which process writes it (`process_identity`: pid, start time, boot id). A process killed
  with SIGKILL cannot write a final status, so the next run finds its record still `running` with an owner
  that is gone and marks it `crashed` (`mark_crashed`).
- A record stays under a size whatever a model made (`fit`, for `limits.max_record_mb`): texts are clipped
  (head + tail) shorter and shorter, then long lists and objects cut, until the JSON fits; a cut record
  stays readable and says so (5,000 refused sub-agents once made a 504 MB run.json).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from rlm_pipelines.text import clip, safe_text


class DiskFull(OSError):
    """A record could not be written for lack of space; the file keeps its last good version."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(exc.errno, f"disk full: could not write {path} ({exc.strerror}); free some space "
                                    f"under {path.parent} (it keeps the last record that fit)")

    def __str__(self) -> str:
        return self.strerror or "disk full"


class FolderTaken(Exception):
    """The run folder already holds another run's run.json."""


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all: written to a temp file beside it, then renamed over it. On a
    full disk the temp file is removed, the old file stays, and `DiskFull` says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a model, a sandbox): U+FFFD in its place
        data = safe_text(text).encode("utf-8")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, exc) from exc
        raise


def write_json(path: Path, data: Any) -> None:
    """JSON record (indented, non-ASCII kept as it is) written with `write_atomic`."""
    write_atomic(path, json.dumps(data, ensure_ascii=False, indent=1, default=str))


def disk_full(exc: Optional[BaseException]) -> Optional[str]:
    """What the console says when `exc` (or an error in its chain) is a full disk: "disk full: ..."; else None."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not e for e in seen):
        if isinstance(exc, DiskFull):
            return str(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {exc}"
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def claim_folder(run_dir: Path) -> None:
    """Make `run_dir/run.json` this run's, atomically (O_EXCL), with a first record naming this process (so
    that even a run killed this early is found and marked `crashed`); `FolderTaken` if another run's is there."""
    path = Path(run_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FolderTaken(f"{path} already holds another run's record; a run never writes into another run's "
                          f"folder: leave hydra.run.dir at its default (a fresh folder per run) or name a new "
                          f"folder") from None
    with open(fd, "w", encoding="utf-8") as file:
        json.dump({"status": "running", "process": process_identity(), "run_dir": str(path.parent)}, file)


# --------------------------------------------------------------------------- which process owns a record


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (with the pid, it names one process for good)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def process_identity(pid: Optional[int] = None) -> dict[str, Any]:
    """What tells this process from any other, even after its pid is reused or the machine reboots."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start_ticks": _start_ticks(pid), "boot_id": _boot_id(), "host": socket.gethostname()}


def is_alive(identity: dict[str, Any]) -> bool:
    """Whether the process `identity` names still runs. Records from another host are taken as alive (we
    cannot tell)."""
    if identity.get("host") not in (None, socket.gethostname()):
        return True
    if identity.get("boot_id") and identity["boot_id"] != _boot_id():
        return False
    ticks = _start_ticks(int(identity.get("pid", -1)))
    return ticks is not None and (identity.get("start_ticks") is None or ticks == identity["start_ticks"])


def process_started_at() -> float:
    """When this process started (epoch seconds): the console's total time includes start-up."""
    ticks = _start_ticks(os.getpid())
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration):
        return _IMPORTED
    return boot + ticks / os.sysconf("SC_CLK_TCK") if ticks is not None else _IMPORTED


_IMPORTED = time.time()


# --------------------------------------------------------------------------- stale records

_HEAD = 4096  # the status and the process are near the top of run.json: enough to decide without parsing all
_RUNNING = re.compile(r'"status": "running"')


def mark_crashed(outputs_dir: Path) -> list[Path]:
    """Mark every `running` record under `outputs_dir` whose process is gone as `crashed` (a run killed with
    SIGKILL or a lost machine), with a summary.json; returns the run folders it marked."""
    marked = []
    for path in sorted(Path(outputs_dir).glob("*/*/*/*/run.json")):  # runs/<task>/<date>/<run>, sweeps/...
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                head = file.read(_HEAD)
            if not _RUNNING.search(head):
                continue
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        owner = run.get("process")
        if run.get("status") != "running" or not isinstance(owner, dict) or is_alive(owner):
            continue
        _record_crash(path, run)
        marked.append(path.parent)
    return marked


def _record_crash(path: Path, run: dict[str, Any]) -> None:
    ended = datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="milliseconds")
    error = (f"the process that ran this run (pid {run['process'].get('pid')}) ended without a final record "
             f"(killed with SIGKILL, a full disk, or the machine went down); this record was its last save")
    run.update(status="crashed", error=error, ended_at=ended)
    write_json(path, run)
    summary = path.parent / "summary.json"
    if not summary.exists():
        write_json(summary, {"run_id": run.get("id"), "task": run.get("task"), "engine": run.get("engine"),
                             "model": run.get("model"), "model_name": run.get("model_name"), "status": "crashed",
                             "error": error, **(run.get("usage") or {}), **_counts(run.get("root")), "wall_time_s": run.get("duration_s"), "run_dir": str(path.parent),
                             "files": ["run.json", "summary.json"]})


def _counts(root: Optional[dict[str, Any]]) -> dict[str, int]:
    """Iterations and agents in a saved tree, for the summary of a run that could not write its own."""
    counts = {"iterations": 0, "agents": 0}
    todo = [root] if isinstance(root, dict) else []
    while todo:
        node = todo.pop()
        if node.get("kind") == "agent":
            counts["agents"] += 1
            counts["iterations"] += len(node.get("iterations") or [])
        todo.extend(child for child in node.get("children") or [] if isinstance(child, dict))
    return counts

# (characters kept of each text, items kept of each list, keys kept of each object), gentlest first. Objects
# keep at least 40 keys so run-tree nodes and iterations keep every field they have.
_LEVELS = ((20_000, None, None), (2_000, None, None), (300, 200, None), (100, 20, 200), (40, 4, 40), (20, 0, 40))


def size(value: Any) -> int:
    """Bytes of `value` as the records write it (UTF-8 JSON)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace"))


def fit(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """(`value`, False) when its JSON has at most `max_bytes`; else (a smaller copy that does, True)."""
    if size(value) <= max_bytes:
        return value, False
    smaller = value
    for chars, items, keys in _LEVELS:
        smaller = shrink(value, chars, items, keys)
        if size(smaller) <= max_bytes:
            break
    return smaller, True


def shrink(value: Any, chars: int, items: Any = None, keys: Any = None) -> Any:
    """A copy of `value` with every text clipped to `chars`, lists to their first and last `items` items and
    objects to their first `keys` keys (None: no limit)."""
    if isinstance(value, str):
        return clip(value, chars, note="record size limit limits.max_record_mb")
    if isinstance(value, dict):
        kept = list(value.items())
        if keys is not None and len(kept) > keys:
            kept = kept[:keys] + [("...", f"[{len(kept) - keys} keys cut: limits.max_record_mb]")]
        return {k: shrink(v, chars, items, keys) for k, v in kept}
    if isinstance(value, (list, tuple)):
        if items is not None and len(value) > items:
            value = list(value[: items - items // 2]) + list(value[len(value) - items // 2:]) if items else []
        return [shrink(v, chars, items, keys) for v in value]
    return value
