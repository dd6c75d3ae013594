"""The HTTP transport: the host side of `server.py --http`, for sandboxes reached over the network.

The host POSTs its messages and long-polls for the server's (a GET that returns as soon as there is
something, or after `poll_s`): no fixed polling interval. Requests go through the provider's preview URL, so
they carry the provider's headers (e.g. a preview token) plus our per-session secret. The secret travels
in a header of our own, `X-Rlm-Secret`, not in `Authorization: Bearer`: provider gateways may take
`Authorization` for themselves (Daytona's accepts its API key there), and our own header reaches the
server untouched.

Gateways drop connections and answer 502/503/504 while a server starts or a proxy restarts: those are
retried with backoff. Retrying is safe: every posted message has a sequence number the server uses to drop
duplicates (an `exec` whose response was lost is not run again), and polls ask for events after the last
number received (a lost response loses nothing). When requests keep failing, `RemoteProcess.alive()` (the
provider's own view of the server process) decides between "still starting / transient" and "gone".

Every response body is read as a stream and abandoned past a byte cap (a poll may carry several frames:
`POLL_FRAMES` of them), so a server that answers with gigabytes costs the host one capped body; that, or
a body that is not the expected JSON, is a ProtocolViolation.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from typing import Any, Iterator, Optional, Protocol

import httpx

from rlm_pipelines.repl.protocol import SETTING, ProtocolViolation, check, encode

log = logging.getLogger(__name__)

POLL_FRAMES = 4  # a poll's body may hold this many full-size frames
SMALL_BODY = 64 * 1024  # any other answer (to a post, an error page)
JSON = {"Content-Type": "application/json"}

TRANSIENT_STATUS = {502, 503, 504}
TRANSIENT_ERRORS = (httpx.TransportError,)  # connect/read errors, resets, timeouts


class RemoteProcess(Protocol):
    """The server process as the sandbox provider sees it."""

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def exit_info(self) -> str: ...


class HttpTransport:
    def __init__(self, url: str, headers: dict[str, str], process: RemoteProcess, retry_s: float = 60.0,
                 poll_s: float = 25.0):
        """`url`: the server's base URL (the preview link of its port); `headers`: provider token and
        `X-Rlm-Secret`; `retry_s`: how long transient failures of one request are retried."""
        self.url, self.process, self.retry_s, self.poll_s = url.rstrip("/"), process, retry_s, poll_s
        # One client per direction, so a long poll never holds up a post (and vice versa).
        # Uncompressed bodies, so the byte cap counts what is held (a gateway may still compress).
        headers = {**headers, "Accept-Encoding": "identity"}
        self._post = httpx.Client(headers=headers, timeout=httpx.Timeout(30.0, connect=10.0))
        self._poll = httpx.Client(headers=headers, timeout=httpx.Timeout(poll_s + 30.0, connect=10.0))
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._killed = threading.Event()
        self._reader_done = threading.Event()

    # -- Transport

    def send(self, message: dict[str, Any]) -> None:
        with self._seq_lock:
            body = encode({"seq": next(self._seq), "message": message})  # ASCII: cannot fail on any text
        self._request(self._post, "POST", "/messages", content=body, headers=JSON)

    def messages(self, max_bytes: int) -> Iterator[dict[str, Any]]:
        """Messages until the server is gone; ProtocolViolation for an oversize or malformed answer."""
        after = 0
        try:
            while not self._killed.is_set():
                try:
                    body = self._request(self._poll, "GET", "/events", cap=POLL_FRAMES * max_bytes,
                                         params={"after": after, "wait": self.poll_s})
                except ConnectionError as exc:
                    if not self._killed.is_set():
                        log.warning("REPL server unreachable: %s", exc)
                    return
                for number, message in _events(body, max_bytes):
                    if number > after:
                        after = number
                        yield message
        finally:
            self._poll.close()
            self._reader_done.set()

    def kill(self) -> None:
        if self._killed.is_set():
            return
        self._killed.set()
        try:  # the server exits on shutdown; the provider's kill below makes sure
            shutdown = encode({"seq": next(self._seq), "message": {"type": "shutdown"}})
            self._post.post(self.url + "/messages", content=shutdown, headers=JSON, timeout=5.0)
        except httpx.HTTPError:
            pass
        self._post.close()
        try:
            self.process.kill()
        except Exception as exc:  # the sandbox may already be gone; deleting it ends the process anyway
            log.debug("killing the REPL process failed: %r", exc)
        # The reader's poll fails fast now that the server is gone. Wait for it: a daemon thread still in
        # network I/O when the interpreter exits aborts the process (SIGABRT) instead of exiting cleanly.
        self._reader_done.wait(timeout=10)

    def exit_info(self) -> str:
        if self._killed.is_set():  # no provider calls after kill(): the process may be exiting
            return "stopped by the host"
        try:
            return self.process.exit_info()
        except Exception as exc:
            return f"state unknown: {exc}"

    # -- requests with retries

    def _request(self, client: httpx.Client, method: str, path: str, cap: int = SMALL_BODY, **kwargs: Any) -> bytes:
        """The body of one request (at most `cap` bytes), retrying transient failures. Raises
        ConnectionError when the server is gone (or was killed) and on answers no retry can fix (403: wrong
        secret); ProtocolViolation for a body over `cap`."""
        first_failure: Optional[float] = None
        delay = 0.1
        while True:
            if self._killed.is_set():
                raise ConnectionError("the REPL server was stopped")
            try:
                with client.stream(method, self.url + path, **kwargs) as response:
                    if response.status_code < 300:
                        return _read_capped(response, cap)
                    status = response.status_code
                    if status not in TRANSIENT_STATUS:
                        text = _read_capped(response, SMALL_BODY, cut=True).decode(errors="replace")
                        raise ConnectionError(f"{method} {path}: HTTP {status}: {text[:300]}")
                problem = f"HTTP {status}"
            except TRANSIENT_ERRORS as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except RuntimeError as exc:  # the client was closed by kill()
                raise ConnectionError(str(exc)) from None
            if self._killed.is_set():
                raise ConnectionError("the REPL server was stopped")
            now = time.monotonic()
            first_failure = first_failure or now
            # A server that is starting answers 502 until it listens; one that exited never will again.
            if not self.process.alive():
                raise ConnectionError(f"{method} {path} failed ({problem}) and the server has exited")
            if now - first_failure > self.retry_s:
                raise ConnectionError(f"{method} {path} kept failing for {self.retry_s:g} s: {problem}")
            log.debug("%s %s: %s; retrying", method, path, problem)
            self._killed.wait(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def _read_capped(response: httpx.Response, cap: int, cut: bool = False) -> bytes:
    """The body, read in chunks and never past `cap` bytes: over it, ProtocolViolation (or, with `cut`,
    the first `cap` bytes: for error pages, which are only shown)."""
    length = response.headers.get("Content-Length", "")
    if not cut and length.isdigit() and int(length) > cap:
        raise ProtocolViolation(f"it answered with a body of {int(length) / 2**20:.1f} MB, over its limit of "
                                f"{cap / 2**20:.1f} MB, which follows {SETTING}")
    body = bytearray()
    for chunk in response.iter_bytes(64 * 1024):
        body += chunk
        if len(body) > cap:
            if cut:
                return bytes(body[:cap])
            raise ProtocolViolation(f"it answered with a body of more than {cap / 2**20:.1f} MB, its limit, "
                                    f"which follows {SETTING}")
    return bytes(body)


def _events(body: bytes, max_bytes: int) -> list[tuple[int, dict[str, Any]]]:
    """The numbered messages of a poll answer, each checked and made safe."""
    try:
        events = json.loads(body.decode("utf-8", "replace"))["events"]
        pairs = [(number, message) for number, message in events if type(number) is int]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolViolation(f"it answered a poll with something else than events: {exc}") from None
    if len(body) > max_bytes:  # only then can one of them be over the limit
        for _, message in pairs:
            if len(json.dumps(message)) > max_bytes:
                raise ProtocolViolation(f"it sent a message of more than {max_bytes / 2**20:.1f} MB, the limit "
                                        f"set by {SETTING}")
    return [(number, check(message)) for number, message in pairs]
