#!/usr/bin/env python3
"""rlm-pipelines REPL server. Runs INSIDE the sandbox.

Stdlib only, Python >= 3.9, one file uploaded verbatim, so it works in any sandbox image; it imports
nothing from rlm_pipelines, so what the host shares (e.g. `rlm_pipelines.text.clip`) has its own
counterpart here (`Capture` cuts cell output head + tail, in bytes, as it streams in). It keeps one
persistent namespace and speaks the message protocol of `protocol.py` (JSON lines, ASCII only, so a lone
surrogate travels as an escape and never breaks the writer) on a channel of its own:

    python3 server.py --fds IN OUT [--max-frame-mb N]       # stdio: a pipe pair inherited from the host
    python3 server.py --http PORT --secret-file F [...]     # HTTP: remote sandboxes, via a preview URL

Two processes, because cell code can read anything its own process holds (fds, argv, memory):
- the BROKER (started by the host) holds the host channel (the fds, or the listener and the secret). It
  makes itself non-dumpable, so same-uid cell code can neither open /proc/<broker>/fd/*, read its memory
  or environ, nor ptrace it. It forks, first thing,
- the WORKER, which runs cells and keeps nothing but a private pipe pair to the broker and fds 0-2: the
  channel fds are closed before any cell runs, and the secret is read only after the fork.
The broker checks every worker frame (only `hello`, `call`, `result`; results only for commands it issued
and has not seen answered, under random ids it chose; fresh call ids; under --max-frame-mb). A violation kills the worker and tells the
  host {"type": "exit", "reason": ...} before the broker exits: a frame cell code forges cannot pass as the
  host's, and one that breaks the rules ends that REPL instead of confusing the host.

Worker threads: the MAIN thread runs cells (so an interrupt is a real SIGINT -> KeyboardInterrupt, which
also breaks blocking calls); a READER thread takes broker messages, answers host replies and interrupts at
once and queues exec/set_vars/register; two DRAIN threads read the cell's fds 1 and 2 (cell output never
travels as a frame). Broker threads: the main thread reads the worker, one reads the host, one waits for
the worker to exit; the HTTP transport adds one event-loop thread (any number of idle connections cost no
thread) and one that exits when the host is gone.
"""

from __future__ import annotations

import _ast  # the compiler's node types; `ast` itself would add 1-2 ms to every start
import builtins
import itertools
import json
import linecache
import os
import queue
import signal
import sys
import threading
import time
import traceback
from types import SimpleNamespace

# Start-up time is the time to first result: what only the HTTP transport, a tool's signature or a bad
# command line needs (hmac, urllib, inspect, argparse) is imported where it is used, not here.

SERVER_FILE = (lambda: None).__code__.co_filename  # this code's own file, also when run from a compiled copy
RESERVED = {"SUBMIT", "FINAL", "FINAL_VAR", "__builtins__", "__name__"}
SETTING = "sandbox.repl.max_message_mb"
SLACK = 64 * 1024  # frame envelope (ids, keys) on top of the payload limit


class _Stop(BaseException):
    """Raised by SUBMIT / FINAL / FINAL_VAR: a BaseException so `except Exception` in cell code cannot
    swallow it and the cell stops at once; the namespace survives."""

    def __init__(self, kind, value):
        super().__init__(kind)
        self.kind, self.value = kind, value


class ToolError(RuntimeError):
    """A host function called from sandbox code failed on the host."""


def encode(message, strict=False):
    """One frame: ASCII JSON (lone surrogates become escapes, never an encoding error) and a newline.
    Not `strict`: what JSON cannot hold goes as its repr."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True,
                      default=None if strict else repr).encode("ascii") + b"\n"


_libc_prctl = []  # [libc's prctl] once looked up


def _load_prctl():
    """Look prctl(2) up through ctypes, once: before the fork, so the broker and the worker share the
    import instead of each paying it (ctypes is a large share of the start-up)."""
    if not _libc_prctl:
        try:
            import ctypes

            _libc_prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except Exception:
            _libc_prctl.append(None)
    return _libc_prctl[0]


def _prctl(option, value):
    """prctl(2); False where it is not available (then the caller says so)."""
    try:
        return _load_prctl()(option, value, 0, 0, 0) == 0
    except Exception:
        return False


PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4


# --------------------------------------------------------------------------- output capture


class Capture:
    """Owns fd 1 or 2: a pipe drained by a thread that keeps head + tail up to `limit` bytes.

    A cell's output ends where the server writes a per-process random marker after the cell; bytes that
    background processes write between cells count towards the next cell.
    """

    def __init__(self, fd, limit, marker):
        self.fd, self.limit, self.marker = fd, max(int(limit), 64), marker
        read_end, self.write_end = os.pipe()
        os.dup2(self.write_end, fd)
        self.cond = threading.Condition()
        self._reset()
        self.ends = 0
        threading.Thread(target=self._drain, args=(read_end,), daemon=True).start()

    def _reset(self):
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def _add(self, data):
        self.total += len(data)
        room = self.limit // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            keep = self.limit - self.limit // 2
            if len(self.tail) > 2 * keep:
                del self.tail[:-keep]

    def _drain(self, read_end):
        carry, keep = b"", len(self.marker) - 1
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                return
            data = carry + chunk
            while True:
                at = data.find(self.marker)
                if at < 0:
                    break
                with self.cond:
                    self._add(data[:at])
                    self.ends += 1
                    self.cond.notify_all()
                data = data[at + len(self.marker):]
            with self.cond:
                self._add(data[:-keep] if len(data) > keep else b"")
            carry = data[-keep:] if len(data) > keep else data

    def begin(self):
        # Cell code may have closed or redirected fd 1/2 in an earlier cell: take them back.
        os.dup2(self.write_end, self.fd)

    def end(self):
        """Wait for everything the cell wrote, then return it as text (cut in the middle if too long)."""
        with self.cond:
            target = self.ends + 1
        os.write(self.write_end, self.marker)
        with self.cond:
            self.cond.wait_for(lambda: self.ends >= target, timeout=10)
            head, tail, total = bytes(self.head), bytes(self.tail), self.total
            self._reset()
        keep = self.limit - self.limit // 2
        tail = tail[-keep:] if len(head) + len(tail) > self.limit else tail
        cut = total - len(head) - len(tail)
        text = head.decode("utf-8", "replace")
        if cut > 0:
            text += "\n... [%d bytes of output cut: head and tail kept] ...\n" % cut
        return text + tail.decode("utf-8", "replace")


# --------------------------------------------------------------------------- channels


class FrameTooLarge(ValueError):
    """A frame longer than the channel's limit; it was not buffered whole."""


class StdioChannel:
    """JSON lines over a pipe pair: the host's pair to the broker, or the broker's private one to the worker."""

    def __init__(self, fd_in, fd_out, limit=None):
        self.reader = os.fdopen(fd_in, "rb", buffering=1 << 16)
        self.fd_out, self.limit = fd_out, limit
        self.lock = threading.Lock()

    def send(self, message):
        self.send_bytes(encode(message))

    def send_bytes(self, data):
        view = memoryview(data)
        with self.lock:
            while view:
                view = view[os.write(self.fd_out, view):]

    def flush(self):
        """Everything sent is written already."""

    def messages(self):
        """Decoded frames; with a limit, a longer line raises FrameTooLarge after reading only limit bytes."""
        while True:
            line = self.reader.readline(self.limit + 1 if self.limit else -1)
            if not line:
                return
            if self.limit and len(line) > self.limit and not line.endswith(b"\n"):
                raise FrameTooLarge("a message over %d MB" % (self.limit >> 20))
            if line.strip():
                yield json.loads(line)


HEAD_LIMIT = 64 * 1024  # request line + headers
POLL_FRAMES = 4  # the host reads a poll answer of at most this many full-size frames (repl/http.py)
HEAD_TIMEOUT = 30.0  # to send a request's head, on a new or an idle kept-alive connection
MAX_CONNECTIONS = 64  # open at once; at the limit the oldest never-authenticated one is dropped


class HttpChannel:
    """The HTTP transport: the host POSTs its messages to /messages and long-polls GET /events for ours.

    Every request must carry the per-session secret (header X-Rlm-Secret; the provider's own token is
    checked by its gateway before we see anything). The secret is checked on the request head, before any
    body is read; a body must have a valid Content-Length under the frame limit. One asyncio loop in one
    thread serves every connection, so idle or slow connections (cell code can open them on localhost)
    cost no threads, and at MAX_CONNECTIONS the oldest connection that never authenticated is dropped.

    Retries are safe both ways: the host numbers what it posts (`seq`) and one already seen is acknowledged
    and dropped, so a retried POST after a lost response never runs a cell twice; we number what we send and
    the host asks for what comes after the last number it has, so a lost poll response loses nothing
    (acknowledged events are dropped then). A host not heard from for `idle_exit` seconds is gone: the
    server exits rather than outlive it.
    """

    def __init__(self, port, secret, max_body, idle_exit=300.0):
        import asyncio
        import hmac
        from urllib.parse import parse_qs, urlparse

        self.asyncio, self.hmac, self.parse_qs, self.urlparse = asyncio, hmac, parse_qs, urlparse
        self.secret, self.max_body, self.idle_exit = secret.encode(), max_body, idle_exit
        self.inbox = queue.Queue()
        self.outbox = []  # [(n, message, encoded size)], n increasing
        self.sent = self.delivered = 0
        self.seen = set()
        self.lock = threading.Lock()
        self.heard = time.monotonic()
        self.connections = {}  # writer -> authenticated yet, in the order they opened
        self.loop = asyncio.new_event_loop()
        self.changed = None
        started = queue.Queue()
        threading.Thread(target=self._run, args=(port, started), daemon=True).start()
        failure = started.get()
        if failure is not None:
            raise failure

    def _run(self, port, started):
        asyncio = self.asyncio
        asyncio.set_event_loop(self.loop)
        self.changed = asyncio.Event()
        try:
            self.loop.run_until_complete(asyncio.start_server(self._serve, "0.0.0.0", port, limit=HEAD_LIMIT,
                                                              backlog=128))
        except OSError as exc:
            started.put(exc)
            return
        started.put(None)
        self.loop.run_forever()

    # -- the transport, for the broker (any thread)

    def send(self, message):
        size = len(encode(message))  # fails here, in the sender, if it cannot be encoded
        with self.lock:
            self.sent += 1
            self.outbox.append((self.sent, message, size))
        self.loop.call_soon_threadsafe(self._wake)

    def flush(self, timeout=5.0):
        """Wait (a little) until the host has received everything sent, e.g. an exit message."""
        end = time.monotonic() + timeout
        while self.delivered < self.sent and time.monotonic() < end:
            time.sleep(0.05)

    def messages(self):
        while True:
            yield self.inbox.get()

    def watch_host(self, gone):
        while True:
            time.sleep(5)
            if time.monotonic() - self.heard > self.idle_exit:
                gone()

    # -- the server (event loop thread)

    def _wake(self):
        changed, self.changed = self.changed, self.asyncio.Event()
        changed.set()

    def _admit(self, writer):
        if len(self.connections) >= MAX_CONNECTIONS:
            stranger = next((w for w, known in self.connections.items() if not known), writer)
            self.connections.pop(stranger, None)
            stranger.transport.abort()
        if not writer.transport.is_closing():
            self.connections[writer] = False

    async def _serve(self, reader, writer):
        asyncio = self.asyncio
        self._admit(writer)
        try:
            while writer in self.connections:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
                method, target, headers = _parse_head(head)
                if not self.hmac.compare_digest(headers.get("x-rlm-secret", "").encode(), self.secret):
                    return await self._reply(writer, 403, {"error": "wrong or missing X-Rlm-Secret"}, True)
                self.connections[writer] = True
                self.heard = time.monotonic()
                body = b""
                if method == "POST":
                    length = headers.get("content-length", "")
                    if not length.isdigit():
                        return await self._reply(writer, 400, {"error": "POST needs a Content-Length"}, True)
                    if int(length) > self.max_body:
                        return await self._reply(writer, 413, {"error": "body over %d bytes (%s)"
                                                               % (self.max_body, SETTING)}, True)
                    body = await asyncio.wait_for(reader.readexactly(int(length)), HEAD_TIMEOUT)
                code, answer = await self._handle(method, target, body)
                await self._reply(writer, code, answer, headers.get("connection", "").lower() == "close")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError,
                ValueError):
            pass  # a dropped, slow or garbled client: close it
        finally:
            self.connections.pop(writer, None)
            writer.close()  # what was written still goes out

    async def _reply(self, writer, code, body, close):
        from http import HTTPStatus

        data = encode(body)
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
                % (code, HTTPStatus(code).phrase, len(data), "Connection: close\r\n" if close else ""))
        writer.write(head.encode("ascii") + data)
        await writer.drain()
        if close:
            self.connections.pop(writer, None)

    async def _handle(self, method, target, body):
        url = self.urlparse(target)
        if method == "POST" and url.path == "/messages":
            try:
                posted = json.loads(body)
                seq, message = posted["seq"], posted["message"]
                if not isinstance(message, dict):
                    raise TypeError("message is not an object")
            except (ValueError, KeyError, TypeError) as exc:
                return 400, {"error": "expected {seq, message}: %s" % exc}
            duplicate = seq in self.seen
            self.seen.add(seq)
            if not duplicate:
                self.inbox.put(message)
            return 200, {"ok": True, "duplicate": duplicate}
        if method == "GET" and url.path == "/events":
            query = self.parse_qs(url.query)
            try:
                after = int(query.get("after", ["0"])[0])
                wait = max(0.0, min(float(query.get("wait", ["25"])[0]), 60.0))
            except ValueError as exc:
                return 400, {"error": "after and wait must be numbers: %s" % exc}
            return 200, {"events": await self._events_after(after, wait)}
        return 404, {"error": "POST /messages or GET /events only"}

    async def _events_after(self, after, wait):
        """Our messages numbered above `after`, waiting up to `wait` seconds for the first one."""
        end = self.loop.time() + wait
        while True:
            changed = self.changed
            with self.lock:
                self.outbox = [item for item in self.outbox if item[0] > after]  # the host has the rest
                events = self._batch()
                if events:
                    self.delivered = max(self.delivered, events[-1][0])
            left = end - self.loop.time()
            if events or left <= 0:
                return events
            try:
                await self.asyncio.wait_for(changed.wait(), left)
            except self.asyncio.TimeoutError:
                pass


    def _batch(self):
        """The oldest unacknowledged events that fit in one poll answer: the host reads at most POLL_FRAMES
        full-size frames per poll, so many large frames queued at once go out over several polls."""
        events, room = [], (POLL_FRAMES - 1) * self.max_body
        for number, message, size in self.outbox:
            if events and size + 16 > room:
                break
            events.append([number, message])
            room -= size + 16
        return events


def _parse_head(head):
    """(method, target, {lower-case header: value}) of a request head; ValueError if it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


# --------------------------------------------------------------------------- the worker


class Worker:
    """Runs cells in one persistent namespace; talks only to the broker, over `channel`."""

    def __init__(self, channel, output_limit, max_frame):
        self.channel, self.max_frame = channel, max_frame
        marker = b"\x00<rlm-cell-end-" + os.urandom(8).hex().encode() + b">\x00"
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # input() gets EOF instead of hanging the cell
        os.close(devnull)
        self.out = Capture(1, output_limit, marker)
        self.err = Capture(2, output_limit, marker)
        self.builtins = dict(vars(builtins))  # pristine: cells get a copy, renewed after every cell
        self.cell_builtins = dict(self.builtins)
        self.namespace = {"__name__": "__main__", "__builtins__": self.cell_builtins}
        self.scaffold = {}  # name -> object the REPL provides, put back after every cell
        self.tool_names = set()
        self.submit_fields = None
        self.commands = queue.Queue()
        self.pending = {}  # call_id -> [Event, reply]
        self.pending_lock = threading.Lock()
        self.call_ids = itertools.count(1)
        self.cells = itertools.count(1)
        self.running = None  # id of the cell in flight, for interrupts
        self.in_cell = False
        self.main_ident = threading.get_ident()
        signal.signal(signal.SIGINT, self._on_sigint)

    # -- messages from the host, through the broker (reader thread)

    def read_loop(self):
        try:
            for message in self.channel.messages():
                kind = message.get("type")
                if kind == "reply":
                    with self.pending_lock:
                        slot = self.pending.get(message.get("call_id"))
                    if slot is not None:  # a late reply to an interrupted call is dropped
                        slot[1] = message
                        slot[0].set()
                elif kind == "interrupt":
                    if self.running is not None and message.get("id") in (None, self.running):
                        signal.pthread_kill(self.main_ident, signal.SIGINT)
                elif kind == "shutdown":
                    break
                else:
                    self.commands.put(message)
        except Exception as exc:  # a broken channel: nobody is left to talk to
            sys.__stderr__.write("rlm repl server: channel failed: %r\n" % (exc,))
        os._exit(0)  # broker gone: never outlive the session

    def _on_sigint(self, signum, frame):
        if self.in_cell:
            raise KeyboardInterrupt("interrupted by the host (cell timeout)")

    # -- calls to the host (any thread of cell code)

    def call_host(self, name, args, kwargs):
        call_id = next(self.call_ids)
        slot = [threading.Event(), None]
        try:
            data = encode({"type": "call", "call_id": call_id, "name": name, "args": list(args),
                           "kwargs": kwargs}, strict=True)
        except (TypeError, ValueError) as exc:
            raise TypeError("%s(): arguments must be JSON-compatible (str, int, float, bool, list, dict, "
                            "None): %s" % (name, exc)) from None
        if len(data) > self.max_frame:  # refused here, never sent: the host would end the REPL for it
            raise ValueError("%s(): the arguments are %.1f MB, over the %g MB limit of one message (%s); pass "
                             "less per call (e.g. split the text)" % (name, len(data) / (1 << 20),
                                                                     self.max_frame / (1 << 20), SETTING))
        with self.pending_lock:
            self.pending[call_id] = slot
        try:
            self.channel.send_bytes(data)
            slot[0].wait()
        finally:
            with self.pending_lock:
                self.pending.pop(call_id, None)
        reply = slot[1]
        if "error" in reply:
            raise ToolError("%s() failed on the host: %s" % (name, reply["error"]))
        return reply.get("value")

    def _make_tool(self, name, params, doc):
        signature = _signature(params) if params is not None else None

        def tool(*args, **kwargs):
            if signature is not None:  # a wrong call fails here, with Python's own message
                try:
                    signature.bind(*args, **kwargs)
                except TypeError as exc:
                    raise TypeError("%s%s: %s" % (name, signature, exc)) from None
            return self.call_host(name, args, kwargs)

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = doc or None
        tool.__signature__ = signature
        return tool

    # -- builtins that end a run

    def _submit(self, *args, **kwargs):
        fields = self.submit_fields
        if fields is None:
            if len(args) != 1 or kwargs:
                raise TypeError("SUBMIT takes exactly one value")
            values = {"output": args[0]}
        else:
            if args and kwargs:
                raise TypeError("SUBMIT takes positional or keyword values, not both")
            if len(args) > len(fields):
                raise TypeError("SUBMIT got %d values for %d fields %s" % (len(args), len(fields), fields))
            values = dict(zip(fields, args)) if args else dict(kwargs)
            missing, unknown = [f for f in fields if f not in values], [k for k in values if k not in fields]
            if missing or unknown:
                raise TypeError("SUBMIT fields must be exactly %s (missing %s, unknown %s)"
                                % (fields, missing, unknown))
        _check_json("SUBMIT", values)
        raise _Stop("submit", values)

    def _final(self, answer):
        raise _Stop("final", answer if _is_json(answer) else str(answer))

    def _final_var(self, name):
        if not isinstance(name, str):
            raise TypeError("FINAL_VAR takes the NAME of a variable as a string, e.g. FINAL_VAR('report')")
        if name not in self.namespace:
            raise NameError("FINAL_VAR: no variable named %r; define it first or use FINAL(value)" % name)
        value = self.namespace[name]
        raise _Stop("final", value if _is_json(value) else str(value))

    # -- commands (main thread)

    def register(self, message):
        for name in self.tool_names:
            self.namespace.pop(name, None)
        tools = message.get("tools") or []
        self.tool_names = {t["name"] for t in tools}
        for spec in tools:
            _check_name(spec["name"])
            self.namespace[spec["name"]] = self._make_tool(spec["name"], spec.get("params"), spec.get("doc"))
        self.submit_fields = message.get("submit_fields")
        self.scaffold = {"SUBMIT": self._submit}
        if message.get("final"):
            self.scaffold.update(FINAL=self._final, FINAL_VAR=self._final_var)
        else:
            for name in ("FINAL", "FINAL_VAR"):
                self.namespace.pop(name, None)
        self.scaffold.update((name, self.namespace[name]) for name in self.tool_names)
        self.namespace.update(self.scaffold)

    def _restore_scaffold(self):
        """Put back the names the REPL provides (SUBMIT, FINAL, the host functions, the builtins) that a
        cell rebound, deleted or changed, as dspy's interpreters do, so `SUBMIT = None` in one cell cannot
        break the next; the names put back, for a note in the cell's stderr."""
        restored = [name for name, obj in self.scaffold.items() if self.namespace.get(name) is not obj]
        self.namespace.update(self.scaffold)
        if self.namespace.get("__builtins__") is not self.cell_builtins:
            restored.append("__builtins__")
        self.cell_builtins = self.namespace["__builtins__"] = dict(self.builtins)  # a copy: 2 us, a check costs more
        return restored

    def set_vars(self, message):
        variables = message.get("vars") or {}
        if message.get("file"):  # large inputs arrive as a file uploaded once, not in the message
            with open(message["file"], encoding="utf-8") as handle:
                variables = json.load(handle)
        for name in variables:
            _check_name(name)
            if name in self.tool_names:
                raise ValueError("variable %r would hide the host function of the same name" % name)
        self.namespace.update(variables)

    def exec_cell(self, message):
        """Run one cell; returns the result fields. Errors in the cell are results, not failures."""
        code = message.get("code", "")
        filename = "<cell-%d>" % next(self.cells)
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        error = final = value = data = None
        for capture in (self.out, self.err):
            capture.begin()
        self.running = message.get("id")
        started = time.perf_counter()
        try:
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
            body = compile(tree, filename, "exec")
            tail = compile(_ast.Expression(last.value), filename, "eval") if last is not None else None
            self.in_cell = True
            try:
                exec(body, self.namespace)
                result = eval(tail, self.namespace) if tail is not None else None
            finally:
                self.in_cell = False
            if result is not None:
                value, data = _trailing(result)
        except _Stop as stop:
            final = {"kind": stop.kind, "value": stop.value}
        except SyntaxError as exc:
            error = {"type": "SyntaxError", "message": str(exc),
                     "traceback": "".join(traceback.format_exception_only(SyntaxError, exc))}
        except BaseException as exc:  # KeyboardInterrupt included: the cell stops, the REPL lives on
            error = _describe(exc)
        finally:
            self.in_cell = False
            self.running = None
        duration = time.perf_counter() - started
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        restored = self._restore_scaffold()
        stderr = self.err.end()
        if restored:
            stderr += ("[%s: provided by the REPL, put back after this cell; use other names for your own "
                       "values]\n" % ", ".join(sorted(restored)))
        return self._bounded({"stdout": self.out.end(), "stderr": stderr, "error": error,
                              "final": final, "value": value, "data": data, "duration_s": duration})

    def _bounded(self, result):
        """A result that fits one message. A trailing value over the limit is shown by its cut text alone;
        a final value over the limit becomes an error naming the setting."""
        size = len(encode(result))
        if size <= self.max_frame:
            return result
        if result["data"] is not None or result["value"] is not None:
            text = result["value"] or ""
            result["data"] = None
            if len(encode(result)) > self.max_frame:
                result["value"] = (text[: self.max_frame // 32] + "\n... [the value is over the %g MB limit of one "
                                   "message (%s): cut] ...\n" % (self.max_frame / (1 << 20), SETTING)
                                   + text[-self.max_frame // 32:])
            size = len(encode(result))
            if size <= self.max_frame:
                return result
        limit = self.max_frame / (1 << 20)
        message = ("the cell's final value is %.1f MB, over the %g MB limit of one message (%s); write it to a "
                   "file or return less" % (size / (1 << 20), limit, SETTING))
        result.update(final=None, value=None, data=None, error={"type": "ValueError", "message": message,
                                                     "traceback": "ValueError: %s\n" % message})
        for key in ("stdout", "stderr"):  # only when output_limit_chars is set above the message limit
            if len(encode(result)) > self.max_frame:
                result[key] = result[key][: self.max_frame // 4] + "\n... [cut: %s]\n" % SETTING
        return result

    def serve(self):
        handlers = {"exec": self.exec_cell, "set_vars": self.set_vars, "register": self.register}
        self.channel.send({"type": "hello", "python": sys.version.split()[0]})
        threading.Thread(target=self.read_loop, daemon=True).start()
        while True:
            message = self.commands.get()
            handler = handlers.get(message.get("type"))
            reply = {"type": "result", "id": message.get("id")}
            try:
                if handler is None:
                    raise ValueError("unknown message type %r" % message.get("type"))
                reply.update(handler(message) or {})
            except KeyboardInterrupt:
                continue  # an interrupt that raced the end of a cell: nothing was running
            except Exception as exc:
                reply["error"] = _describe(exc)
            try:
                self.channel.send(reply)
            except (TypeError, ValueError) as exc:  # e.g. a circular value: say so instead of going silent
                self.channel.send({"type": "result", "id": reply["id"], "error": _describe(exc)})


# --------------------------------------------------------------------------- the broker


class Violation(Exception):
    """The worker (so, cell code) broke the protocol; the REPL must end."""


class Broker:
    """Holds the host channel; runs cells in a worker process that never sees it, and checks its frames."""

    def __init__(self, channel, worker, to_worker, from_worker, max_frame):
        """`worker`: its pid; `to_worker`, `from_worker`: our ends of its pipe pair."""
        self.channel, self.max_frame = channel, max_frame
        self.worker, self.to_worker = worker, to_worker
        self.from_worker = StdioChannel(from_worker, None, max_frame + SLACK)
        self.worker_read = threading.Event()  # the worker's pipe is at its end
        self.lock = threading.Lock()
        self.commands = {}  # random id given to the worker -> the host's id, while the command runs
        self.calls = {}  # our call id towards the host -> the worker's call id, while the call runs
        # Call ids the worker has used, each only once: all below the floor, and those in the set.
        self.worker_calls, self.calls_floor = set(), 1
        self.call_ids = itertools.count(1)
        self.ending = False
        self.write_lock = threading.Lock()

    def serve(self):
        # Hello at once: the worker sets up (and says its own hello, checked here) while the host gets ready.
        self.channel.send({"type": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
        threading.Thread(target=self._read_host, daemon=True).start()
        threading.Thread(target=self._wait_worker, daemon=True).start()
        watch = getattr(self.channel, "watch_host", None)
        if watch is not None:
            threading.Thread(target=watch, args=(self._host_gone,), daemon=True).start()
        try:
            hello = True
            for message in self.from_worker.messages():
                self._from_worker(message, hello)
                hello = False
        except Violation as exc:
            self._violation(str(exc))
        except FrameTooLarge:
            self._violation("the REPL sent a message over the %g MB limit (%s)" % (self.max_frame / (1 << 20),
                                                                                  SETTING))
        except (ValueError, TypeError) as exc:
            self._violation("the REPL sent a message that is not JSON or not a protocol message: %s" % exc)
        except OSError as exc:  # the host's end is closed: nobody is left to talk to
            sys.stderr.write("rlm repl server: channel failed: %r\n" % (exc,))
            self._end(0)
        self.worker_read.set()  # the worker is gone or going (or left its pipe to a child)
        threading.Event().wait()  # _wait_worker ends the process

    # -- worker -> host

    def _from_worker(self, message, first):
        kind = message.get("type") if isinstance(message, dict) else None
        if first != (kind == "hello"):
            raise Violation("the REPL sent %r where %s was due" % (kind, "hello" if first else "call or result"))
        if kind == "hello":  # the host had ours already
            return None
        if kind == "result":
            with self.lock:
                host_id = self.commands.pop(message.get("id"), self)
            if host_id is self:
                raise Violation("the REPL answered a command that was not asked or already answered")
            return self.channel.send({**message, "id": host_id})
        if kind != "call":
            raise Violation("the REPL sent a message of type %r" % (kind,))
        worker_call = message.get("call_id")
        with self.lock:
            if type(worker_call) is not int or worker_call < self.calls_floor or worker_call in self.worker_calls:
                raise Violation("the REPL reused call id %r (or it is not a positive integer)" % (worker_call,))
            self.worker_calls.add(worker_call)
            while self.calls_floor in self.worker_calls:  # ids below the floor are all used: forget them
                self.worker_calls.remove(self.calls_floor)
                self.calls_floor += 1
            running = bool(self.commands)
            call_id = next(self.call_ids)
            if running:
                self.calls[call_id] = worker_call
        if not running:  # a thread or process left behind by an earlier cell: no host work outside a cell
            return self._to_worker({"type": "reply", "call_id": worker_call,
                                    "error": "host functions can only be called while a cell runs"})
        self.channel.send({"type": "call", "call_id": call_id, "name": message.get("name"),
                           "args": message.get("args"), "kwargs": message.get("kwargs")})

    # -- host -> worker

    def _read_host(self):
        try:
            for message in self.channel.messages():
                if not self._from_host(message):
                    break
        except Exception as exc:  # a broken channel: nobody is left to talk to
            sys.stderr.write("rlm repl server: channel failed: %r\n" % (exc,))
        self._end(0)  # host gone or shutdown: never outlive the session

    def _from_host(self, message):
        kind = message.get("type")
        if kind == "shutdown":
            return False
        if kind == "reply":
            with self.lock:
                worker_call = self.calls.pop(message.get("call_id"), self)
            if worker_call is not self:  # a late reply to an interrupted call is dropped
                self._to_worker({**message, "call_id": worker_call})
        elif kind == "interrupt":
            with self.lock:
                ids = [w for w, h in self.commands.items() if message.get("id") in (None, h)]
            if ids:
                self._to_worker({"type": "interrupt", "id": ids[0]})
        else:
            worker_id = os.urandom(8).hex()  # as secrets.token_hex, without its imports
            with self.lock:
                self.commands[worker_id] = message.get("id")
            self._to_worker({**message, "id": worker_id})
        return True

    def _to_worker(self, message):
        view = memoryview(encode(message))
        try:
            with self.write_lock:
                while view:
                    view = view[os.write(self.to_worker, view):]
        except OSError:  # the worker closed its end: it is going, and _wait_worker reports how
            pass

    # -- endings

    def _violation(self, reason):
        with self.lock:
            self.ending = True
        _kill(self.worker)
        sys.stderr.write("rlm repl server: protocol violation, REPL stopped: %s\n" % reason)
        sys.stderr.flush()
        try:
            self.channel.send({"type": "exit", "reason": "protocol violation: %s" % reason})
            self.channel.flush()
        except Exception:
            pass
        os._exit(1)

    def _host_gone(self):
        self._end(0)

    def _end(self, code):
        with self.lock:
            self.ending = True
        _kill(self.worker)
        os._exit(code)

    def _wait_worker(self):
        """When the worker exits (a cell called os._exit, a crash, a kill), end the same way, once what it
        wrote before is passed on."""
        code = os.waitstatus_to_exitcode(os.waitpid(self.worker, 0)[1])
        self.worker_read.wait(timeout=2)
        with self.lock:
            if self.ending:
                return
            self.ending = True
        if code < 0:  # killed by a signal: die of the same one, so the host's "killed by signal N" holds
            try:
                signal.signal(-code, signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
                pass
            os.kill(os.getpid(), -code)
            time.sleep(1)
        os._exit(code if code >= 0 else 128 - code)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# --------------------------------------------------------------------------- helpers


def _check_name(name):
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
        raise ValueError("%r is not a usable name in the REPL (reserved or not an identifier)" % (name,))


def _is_json(value):
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _check_json(what, value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError("%s values must be JSON-compatible (str, int, float, bool, list, dict, None): %s"
                        % (what, exc)) from None


def _trailing(value):
    """A cell's trailing value as (text, data): what the model is shown (a str as itself, anything else as
    its repr, cut at 10,000 characters) and, for a JSON-compatible value that is not a str, the value
    itself (else None), as dspy's interpreters return it."""
    if isinstance(value, str):
        return value, None
    return _short_repr(value), value if _is_json(value) else None


def _short_repr(value, limit=10_000):
    try:
        text = repr(value)
    except Exception as exc:
        text = "<repr failed: %r>" % (exc,)
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]


def _describe(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != SERVER_FILE]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(lines)}


def _signature(params):
    """Rebuild a tool's signature from the host's `inspect` strings, e.g. ["path", "replace_all=False"]."""
    import inspect

    kinds, out = inspect.Parameter, []
    for text in params:
        kind, default = kinds.POSITIONAL_OR_KEYWORD, kinds.empty
        if text.startswith("**"):
            kind, text = kinds.VAR_KEYWORD, text[2:]
        elif text.startswith("*"):
            kind, text = kinds.VAR_POSITIONAL, text[1:]
        name, _, default_text = text.partition("=")
        name = name.split(":")[0].strip()
        if default_text:
            try:
                import ast

                default = ast.literal_eval(default_text.strip())
            except (ValueError, SyntaxError):
                default = None
        if out and out[-1].kind == kinds.VAR_POSITIONAL and kind == kinds.POSITIONAL_OR_KEYWORD:
            kind = kinds.KEYWORD_ONLY
        out.append(inspect.Parameter(name, kind, default=default))
    try:
        return inspect.Signature(out)
    except ValueError:
        return None


# option -> (number of values, type, default); `_parser` describes the same options for errors and --help
OPTIONS = {"--fds": (2, int, None), "--http": (1, int, None), "--secret-file": (1, str, None),
           "--idle-exit": (1, float, 300.0), "--output-limit": (1, int, 100_000), "--max-frame-mb": (1, float, 8.0),
           "--rlimits": (1, str, None)}


def _parser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--fds", nargs=2, type=int, metavar=("IN", "OUT"))
    how.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--secret-file", help="with --http: file holding the session secret (deleted once read, "
                        "so it is not on the command line for sandbox code to read)")
    parser.add_argument("--idle-exit", type=float, default=300.0, help="with --http: exit when the host is "
                        "silent this long")
    parser.add_argument("--output-limit", type=int, default=100_000)
    parser.add_argument("--max-frame-mb", type=float, default=8.0, help="largest message either way, in MB "
                        "(%s)" % SETTING)
    parser.add_argument("--rlimits", help="per-process limits to set first, e.g. as=1073741824,nproc=64 "
                        "(prlimit's names)")
    return parser


def _parse_args(argv):
    """The command line the host writes, read without argparse (its import is a tenth of our start-up);
    anything else (--help, a mistake) goes to argparse, which explains it."""
    args = {name[2:].replace("-", "_"): default for name, (_, _, default) in OPTIONS.items()}
    at = 0
    try:
        while at < len(argv):
            count, kind, _ = OPTIONS[argv[at]]
            values = [kind(value) for value in argv[at + 1:at + 1 + count]]
            if len(values) != count or any(v.startswith("-") for v in argv[at + 1:at + 1 + count]):
                raise ValueError(argv[at])
            args[argv[at][2:].replace("-", "_")] = values if count > 1 else values[0]
            at += 1 + count
        if (args["fds"] is None) == (args["http"] is None):
            raise ValueError("--fds or --http")
    except (KeyError, ValueError):
        args = vars(_parser().parse_args(argv))
    return SimpleNamespace(**args)


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    max_frame = int(args.max_frame_mb * (1 << 20))
    if args.http is not None and not args.secret_file:
        _parser().error("--http needs --secret-file")
    if args.rlimits:
        _set_rlimits(args.rlimits)
    _load_prctl()
    worker, to_worker, from_worker = start_worker(args.output_limit, max_frame)
    # From here on this process is the broker; no cell code has run yet.
    if not _prctl(PR_SET_DUMPABLE, 0):  # before the secret is read or the channel used
        sys.stderr.write("rlm repl server: warning: cannot make the server non-dumpable (no prctl)\n")
    if args.http is not None:
        with open(args.secret_file) as handle:
            secret = handle.read().strip()
        os.unlink(args.secret_file)
        channel = HttpChannel(args.http, secret, max_frame + SLACK, args.idle_exit)
    else:
        channel = StdioChannel(*args.fds)
    Broker(channel, worker, to_worker, from_worker, max_frame).serve()


def _set_rlimits(spec):
    """Set the limits the host names (`as=N,cpu=N,...`) as soft and hard limits, before any cell code can
    run: what prlimit would set, without a process of its own. Never above a hard limit already in place;
    a name or value that cannot be set ends the server (never run without them)."""
    import resource

    for item in spec.split(","):
        name, _, value = item.partition("=")
        kind = getattr(resource, "RLIMIT_" + name.upper())
        hard = resource.getrlimit(kind)[1]
        limit = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(kind, (limit, limit))


def start_worker(output_limit, max_frame):
    """Fork the worker: (pid, our end towards it, our end from it).

    Forked before anything secret is read and before any thread starts (a fork copies memory, not
    threads), it keeps only its private pipe pair and fds 0-2: the host's channel fds are closed before
    any cell code can run. Forking spares a second interpreter start."""
    worker_in, to_worker = os.pipe()
    from_worker, worker_out = os.pipe()
    broker = os.getpid()
    pid = os.fork()
    if pid:
        os.close(worker_in)
        os.close(worker_out)
        return pid, to_worker, from_worker
    try:
        low = 3
        for keep in sorted((worker_in, worker_out)):  # every fd but 0-2 and the pair: the host's channel too
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))
        sys.argv = [SERVER_FILE]
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the broker gone (killed): so is the worker
        if os.getppid() != broker:
            os._exit(1)
        run_worker(worker_in, worker_out, output_limit, max_frame)
    except BaseException:
        traceback.print_exc()
    os._exit(1)


def run_worker(fd_in, fd_out, output_limit, max_frame):
    """The worker: its channel is the broker's pipe pair; fds 0-2 are then taken over for the cell."""
    channel = StdioChannel(fd_in, fd_out)
    sys.stdout.reconfigure(errors="backslashreplace", line_buffering=True)  # print and os.system stay in order
    sys.stderr.reconfigure(errors="backslashreplace")
    Worker(channel, output_limit, max_frame).serve()


if __name__ == "__main__":
    main()
