"""Which process a local sandbox folder belongs to, so a clean-up can remove what a killed run left.

A run stops and deletes its sandboxes on every ending it sees (errors, Ctrl-C, SIGTERM); SIGKILL it cannot
see. Each local sandbox folder holds `owner.json` (pid, start time, boot id of the process that made it,
outside the folders the sandbox mounts); `python -m rlm_pipelines.sandbox cleanup --local` removes the
folders whose owner is gone and never those of a run still going.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from rlm_pipelines.records import is_alive, process_identity

OWNER_FILE = "owner.json"
PREFIX = "rlm-"  # LocalSandbox folders: rlm-<sandbox id>-<random>


def write_owner(root: Path) -> None:
    (Path(root) / OWNER_FILE).write_text(json.dumps(process_identity()))


def owner_of(folder: Path) -> Optional[dict]:
    """The owner recorded in a sandbox folder (None: not one of ours, or unreadable)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def orphans(base: Optional[str] = None) -> Iterator[tuple[Path, dict]]:
    """Local sandbox folders under `base` (default: the temp dir, where sandboxes go unless
    `sandbox.root_dir` says otherwise) whose owner process is gone."""
    for folder in sorted(Path(base or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = owner_of(folder)
        if owner is not None and not is_alive(owner):
            yield folder, owner


def remove(folder: Path) -> None:
    shutil.rmtree(folder)
