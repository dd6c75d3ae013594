"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks `POST /v1/chat/completions` (JSON, and SSE when `stream` is asked) so litellm and dspy talk to
it exactly as to a provider. Behaviour is programmable: a fixed reply or a function of the request body,
a latency (each request sleeps on its own thread, so a benchmark's 64 parallel calls on a 100 ms LM take
about 100 ms), a queue of failures (status codes) served before replies, or a failure for every request.
Every request is logged (path, lower-cased headers, JSON body). A reply function may return a dict instead
of the text, to serve a quirk: {"content": text or None, "finish_reason": "length", "reasoning_content": ...}.

    with OpenAIServer(reply=lambda req: "hi") as server:
        server.fail(429)                    # the next request gets a 429, then normal replies
        litellm.completion(model="openai/x", api_base=server.url, api_key="k", messages=[...])
        server.requests[-1]["headers"]["authorization"]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

Reply = Callable[[dict[str, Any]], Union[str, dict[str, Any]]]


class _Server(ThreadingHTTPServer):
    fake: "OpenAIServer"  # what _Handler serves
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) refuses bursts of parallel calls

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (timeout) is expected
            super().handle_error(request, client_address)


class OpenAIServer:
    """Start with `with OpenAIServer(...) as server:` (or `start()` / `stop()`); point clients at `url`."""

    def __init__(self, reply: Union[str, Reply, None] = None, latency_s: float = 0.0):
        self.reply: Reply = (lambda request: reply) if isinstance(reply, str) else reply or (lambda request: "ok")
        self.latency_s = latency_s
        self.requests: list[dict[str, Any]] = []
        self._failures: deque[int] = deque()
        self._always_fail: Optional[int] = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail(self, *statuses: int) -> None:
        """The next requests get these HTTP error statuses, in order."""
        with self._lock:
            self._failures.extend(statuses)

    def fail_always(self, status: Optional[int]) -> None:
        """Every request (after the queued failures) gets this status; None serves replies again."""
        with self._lock:
            self._always_fail = status

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)  # quick stop
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _next_failure(self) -> Optional[int]:
        with self._lock:
            if self._failures:
                return self._failures.popleft()
            return self._always_fail


class _Handler(BaseHTTPRequestHandler):
    """One request to the `OpenAIServer` that is `self.server.fake`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        with fake._lock:
            fake.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in
                                                                   self.headers.items()}, "body": body})
        if fake.latency_s:
            time.sleep(fake.latency_s)
        status = fake._next_failure()
        if status is not None:
            return self._send(status, {"error": {"message": f"fake provider error {status}",
                                                 "type": "fake_error", "code": status}})
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        served = fake.reply(body)
        message = served if isinstance(served, dict) else {"content": served}
        finish = message.pop("finish_reason", "stop") if isinstance(served, dict) else "stop"
        text = message.get("content") or ""
        usage = {"prompt_tokens": sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
                 // 4 + 1, "completion_tokens": len(text) // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = body.get("model", "fake")
        if body.get("stream"):
            return self._stream(model, text, usage, finish)
        self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                         "model": model, "usage": usage,
                         "choices": [{"index": 0, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": text, **message}}]})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, model: str, text: str, usage: dict[str, int], finish: str = "stop") -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        chunks = [{"delta": {"role": "assistant", "content": text}, "finish_reason": None},
                  {"delta": {}, "finish_reason": finish}]
        for chunk in chunks:
            event = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                     "created": int(time.time()), "choices": [{"index": 0, **chunk}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        last = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model, "choices": [],
                "usage": usage}
        self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True
