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
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from typing import Any, Iterator, Optional, Protocol

import httpx

log = logging.getLogger(__name__)

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
        self._post = httpx.Client(headers=headers, timeout=httpx.Timeout(30.0, connect=10.0))
        self._poll = httpx.Client(headers=headers, timeout=httpx.Timeout(poll_s + 30.0, connect=10.0))
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._killed = threading.Event()
        self._reader_done = threading.Event()

    # -- Transport

    def send(self, message: dict[str, Any]) -> None:
        with self._seq_lock:
            body = {"seq": next(self._seq), "message": message}
        self._request(self._post, "POST", "/messages", json=body)

    def messages(self) -> Iterator[dict[str, Any]]:
        after = 0
        try:
            while not self._killed.is_set():
                try:
                    reply = self._request(self._poll, "GET", "/events", params={"after": after, "wait": self.poll_s})
                except ConnectionError as exc:
                    if not self._killed.is_set():
                        log.warning("REPL server unreachable: %s", exc)
                    return
                for number, message in reply.json()["events"]:
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
            self._post.post(self.url + "/messages", json={"seq": next(self._seq), "message": {"type": "shutdown"}},
                            timeout=5.0)
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

    def _request(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retrying transient failures. Raises ConnectionError when the server is gone (or
        was killed) and on answers no retry can fix (403: wrong secret)."""
        first_failure: Optional[float] = None
        delay = 0.1
        while True:
            if self._killed.is_set():
                raise ConnectionError("the REPL server was stopped")
            try:
                response = client.request(method, self.url + path, **kwargs)
                if response.status_code < 300:
                    return response
                if response.status_code not in TRANSIENT_STATUS:
                    raise ConnectionError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
                problem = f"HTTP {response.status_code}"
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
