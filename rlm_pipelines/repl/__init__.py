"""The REPL: `server.py` runs inside a sandbox; `session.py` drives it from the host."""

from pathlib import Path

from rlm_pipelines.repl.protocol import CellError, CellResult
from rlm_pipelines.repl.session import ReplDied, ReplError, ReplSession

SERVER_PATH = Path(__file__).resolve().parent / "server.py"  # what every sandbox backend runs (or uploads)

__all__ = ["CellError", "CellResult", "ReplDied", "ReplError", "ReplSession", "SERVER_PATH"]
