"""A Hydra callback (`conf/config.yaml`): a run whose folder already holds a run.json is refused before Hydra
writes its own files (`.hydra/`, the log) into that folder. `records.claim_folder` still decides when two
runs race for one folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class FolderGuard(Callback):
    """A Hydra callback: refuse a run whose folder already holds a run.json before Hydra writes its own
    files (`.hydra/`, the log) into it. `claim_folder` still decides (two runs racing for one folder)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        try:
            path = Path(str(config.hydra.run.dir)) / "run.json"
        except Exception:  # noqa: BLE001 - a run.dir that needs Hydra's runtime (${hydra:...}): claim_folder decides
            return
        if path.exists():
            print(f"error: {path} already holds another run's record; a run never writes into another run's "
                  f"folder: leave hydra.run.dir at its default (a fresh folder per run) or name a new folder",
                  file=sys.stderr)
            sys.exit(2)
