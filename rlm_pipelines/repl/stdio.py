"""The stdio transport: a dedicated pipe pair between the host and a server process it started.

The server gets the pipes as extra inherited fds (not the guest's 0/1/2), so nothing sandbox code prints
can reach the channel. Frames are read in chunks and never held past the frame limit: a longer line is a
ProtocolViolation the moment it passes the limit, so a server that writes gigabytes without a newline
costs the host at most one frame's worth of memory.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
from typing import Any, Callable, Iterator, Optional

from rlm_pipelines.repl.protocol import SETTING, ProtocolViolation, decode, encode

CHUNK = 64 * 1024
STALL_S = 30.0  # a server that reads nothing of a pending frame this long is taken for hung


class StdioTransport:
    def __init__(self, start: Callable[[list[str], tuple[int, int]], subprocess.Popen], server_args: list[str],
                 kill: Optional[Callable[[subprocess.Popen], None]] = None, stall_s: float = STALL_S):
        """`start(extra_args, pass_fds)` launches the server (inside its sandbox) with the server's own
        arguments appended; it must pass the two fds through. `kill(process)` stops it for good; the
        default kills its process group. A send fails when the server reads nothing for `stall_s`."""
        self._kill, self._stall_s = kill or _kill_group, stall_s
        to_server_r, self._to_server = os.pipe()
        os.set_blocking(self._to_server, False)
        self._from_server, from_server_w = os.pipe()
        try:
            self.process = start(server_args + ["--fds", str(to_server_r), str(from_server_w)],
                                 (to_server_r, from_server_w))
        finally:
            os.close(to_server_r)
            os.close(from_server_w)
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._killed = False

    def send(self, message: dict[str, Any]) -> None:
        """Write one frame. A server that stops reading (hung, or hostile) makes this fail after `stall_s`
        instead of holding the write lock, and every later send (an interrupt, say), for ever."""
        data = memoryview(encode(message))
        with self._write_lock:
            if self._killed:
                raise BrokenPipeError("the REPL server was stopped")
            waiter = select.poll()
            waiter.register(self._to_server, select.POLLOUT)
            while data:
                try:
                    data = data[os.write(self._to_server, data):]
                except BlockingIOError:
                    if not waiter.poll(self._stall_s * 1000):
                        raise BrokenPipeError(f"the REPL server read nothing of its channel for "
                                              f"{self._stall_s:g} s") from None

    def messages(self, max_bytes: int) -> Iterator[dict[str, Any]]:
        """Messages until the server closes its end; ProtocolViolation for a line over `max_bytes`."""
        frame = bytearray()
        with os.fdopen(self._from_server, "rb", buffering=0) as stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    return  # a last line without a newline is a server that died mid-write: dropped
                start = 0
                while True:
                    end = chunk.find(b"\n", start)
                    frame += chunk[start:] if end < 0 else chunk[start:end]
                    if len(frame) > max_bytes:
                        raise ProtocolViolation(f"it sent a message of more than {max_bytes / 2**20:.1f} MB, the limit "
                                                f"set by {SETTING}")
                    if end < 0:
                        break
                    if frame and not frame.isspace():
                        yield decode(frame)
                    frame.clear()
                    start = end + 1

    def kill(self) -> None:
        with self._state_lock:
            if self._killed:
                return
            self._killed = True
        # The process first: a send blocked on a full pipe (a server that stopped reading) fails once the
        # server's end is gone, and releases the write lock.
        self._kill(self.process)
        with self._write_lock:
            os.close(self._to_server)

    def exit_info(self) -> str:
        code = self.process.poll()
        if code is None:
            return "still running"
        detail = ""
        if self.process.stderr is not None:
            try:
                os.set_blocking(self.process.stderr.fileno(), False)
                detail = (self.process.stderr.read() or b"").decode(errors="replace").strip()[-2000:]
            except (OSError, ValueError):
                pass
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return how + (f"; stderr: {detail}" if detail else "")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
