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
               final:{kind, value}|null, value: text|null, data: JSON|null, duration_s}
                                                     value/data: the cell's trailing expression (see
                                                     CellResult.value / .data)
    exit      {type, reason}                         the server found a protocol violation and goes down

Bounds and text (both directions): no frame may exceed `sandbox.repl.max_message_mb` (plus `SLACK` for the
envelope). The host reads frames bounded and treats a longer one, or anything that does not decode, as a
violation: it stops that server (`ProtocolViolation`). Everything the host decodes passes through
`safe_data` (lone surrogates -> U+FFFD) and everything it sends is ASCII JSON, so no text can make the
channel fail. The host only honours a `result` whose id it issued and is still waiting for.

Cell output never travels on the protocol channel: the server reads fds 1 and 2 from pipes of its own, so
printing (or `os.system`) cannot forge a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from rlm_pipelines.text import safe_data, safe_text

SLACK = 64 * 1024  # room for a frame's envelope (type, ids, stdout of a cell) on top of the message limit
SETTING = "sandbox.repl.max_message_mb"


class ProtocolViolation(ValueError):
    """The server sent something no honest server sends (an oversize or undecodable frame): it is stopped."""


def frame_limit(max_message_mb: float) -> int:
    """The most bytes one frame may take on the channel."""
    return int(max_message_mb * 1024 * 1024) + SLACK


def too_large(what: str, size: int, max_message_mb: float) -> str:
    """The one way an oversize message is explained: its size, the limit and the setting that sets it."""
    return (f"{what}: {size / 1024 / 1024:.1f} MB, over the REPL's message limit of {max_message_mb:g} MB "
            f"({SETTING}); pass large data through files, or raise {SETTING}")


def encode(message: dict[str, Any]) -> bytes:
    """One frame: lone surrogates made U+FFFD, then ASCII JSON, so encoding cannot fail."""
    return json.dumps(safe_data(message), separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def decode(line: bytes | bytearray | str) -> dict[str, Any]:
    """A frame from the sandbox, made safe to keep and pass on; ProtocolViolation if it is not a message."""
    if not isinstance(line, str):
        line = bytes(line).decode("utf-8", "replace")
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ProtocolViolation(f"it sent a frame that is not JSON ({exc}): {line[:200]!r}") from None
    return check(message)


def check(message: Any) -> dict[str, Any]:
    """`message` made safe (`safe_data`) if it is a protocol message at all, else ProtocolViolation."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolViolation(f"it sent something that is not a protocol message: {str(message)[:200]!r}")
    return safe_data(message)


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
    # The cell's trailing expression, when it is not None, as the model is shown it: a str as the string
    # itself, anything else as its repr (cut at 10,000 characters).
    value: Optional[str] = None
    # The same value as data, the way dspy's interpreters return it: a JSON-compatible value as itself (a
    # str as the string), anything else as its repr text. None when the cell has no trailing value.
    data: Any = None
    duration_s: float = 0.0
    notice: str = ""  # host-side note, e.g. "the REPL was restarted, state was lost"

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> "CellResult":
        """The result frame as a CellResult; fields of the wrong type (no honest server sends them) are
        replaced, so a broken frame can never raise in the host."""
        error, final = message.get("error"), message.get("final")
        duration = message.get("duration_s")
        value = _text(message.get("value")) if message.get("value") is not None else None
        return cls(
            stdout=_text(message.get("stdout")),
            stderr=_text(message.get("stderr")),
            error=_error(error) if error else None,
            final=final if isinstance(final, dict) else None,
            value=value,
            data=message.get("data") if message.get("data") is not None else value,
            duration_s=float(duration) if isinstance(duration, (int, float)) else 0.0,
        )

    @property
    def ok(self) -> bool:
        return self.error is None

    def output(self) -> str:
        """Everything the model should see from this cell, in reading order: printed output, then the
        trailing value's text (as in a notebook), then the error."""
        parts = [self.notice, self.stdout]
        if self.stderr:
            parts.append(self.stderr)
        if self.value is not None:
            parts.append(self.value)
        if self.error is not None:
            parts.append(str(self.error))
        return "\n".join(p.rstrip("\n") for p in parts if p)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else safe_text(repr(value)))


def _error(error: Any) -> CellError:
    if not isinstance(error, dict):
        return CellError("ReplError", _text(error))
    return CellError(_text(error.get("type")) or "Error", _text(error.get("message")), _text(error.get("traceback")))
