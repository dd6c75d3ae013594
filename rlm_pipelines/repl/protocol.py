"""The REPL message protocol, host side. `server.py` speaks the same messages (it cannot import this file:
it is uploaded into sandboxes verbatim and must stay stdlib-only).

One JSON object per line on a stream (stdio transport); the HTTP transport wraps the same objects (posted
as {seq, message}, polled as numbered events: see `http.py`).

host -> sandbox
    exec      {type, id, code}                       run a cell in the persistent namespace
    set_vars  {type, id, vars} | {type, id, file}    inject inputs once per run, not every turn (large
                                                     ones as a JSON file uploaded into the sandbox)
    register  {type, id, tools:[{name, params, doc}], submit_fields:[...]|null, final: bool}
    reply     {type, call_id, value} | {type, call_id, error}
    interrupt {type, id?}                            KeyboardInterrupt in the running cell (that cell
                                                     only, when id is given), state kept
    shutdown  {type}
sandbox -> host
    hello     {type, pid, python}                    the server is up
    call      {type, call_id, name, args, kwargs}    sandbox code called a host function
    result    {type, id, stdout, stderr, error:{type, message, traceback}|null,
               final:{kind, value}|null, value: repr|null, duration_s}

Cell output never travels on the protocol channel: the server reads fds 1 and 2 from pipes of its own, so
printing (or `os.system`) cannot forge a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def decode(line: bytes | str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"not a protocol message: {line[:200]!r}")
    return message


@dataclass
class CellError:
    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return self.traceback or f"{self.type}: {self.message}"


@dataclass
class CellResult:
    """What one cell did. `final` is set when the cell called SUBMIT / FINAL / FINAL_VAR."""

    stdout: str = ""
    stderr: str = ""
    error: Optional[CellError] = None
    final: Optional[dict[str, Any]] = None
    value: Optional[str] = None  # repr of the cell's last expression, when it is not None
    duration_s: float = 0.0
    notice: str = ""  # host-side note, e.g. "the REPL was restarted, state was lost"

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> "CellResult":
        error = message.get("error")
        return cls(
            stdout=message.get("stdout", ""),
            stderr=message.get("stderr", ""),
            error=CellError(**error) if error else None,
            final=message.get("final"),
            value=message.get("value"),
            duration_s=message.get("duration_s", 0.0),
        )

    @property
    def ok(self) -> bool:
        return self.error is None

    def output(self) -> str:
        """Everything the model should see from this cell, in reading order."""
        parts = [self.notice, self.stdout]
        if self.stderr:
            parts.append(self.stderr)
        if self.value is not None and not self.stdout:
            parts.append(self.value)
        if self.error is not None:
            parts.append(str(self.error))
        return "\n".join(p.rstrip("\n") for p in parts if p)
