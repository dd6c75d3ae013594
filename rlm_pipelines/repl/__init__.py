"""The REPL: `server.py` runs inside a sandbox; `session.py` drives it from the host."""

from rlm_pipelines.repl.protocol import CellError, CellResult
from rlm_pipelines.repl.session import ReplDied, ReplError, ReplSession

__all__ = ["CellError", "CellResult", "ReplDied", "ReplError", "ReplSession"]
