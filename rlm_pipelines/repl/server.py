#!/usr/bin/env python3
"""rlm-pipelines REPL server. Runs INSIDE the sandbox.

Stdlib only, Python >= 3.9, one file uploaded verbatim, so it works in any sandbox image; it imports
nothing from rlm_pipelines, so what the host shares (e.g. `rlm_pipelines.text.clip`) has its own
counterpart here (`Capture` cuts cell output head + tail, in bytes, as it streams in). It keeps one
persistent namespace and speaks the message protocol of `protocol.py` (JSON lines) on a channel of its own,
never on the guest's stdout:

    python3 server.py --fds IN OUT        # stdio transport: a dedicated pipe pair inherited from the host
    python3 server.py --http PORT --secret-file F   # HTTP transport: remote sandboxes, via a preview URL

Threads: the MAIN thread runs cells (so an interrupt is a real SIGINT -> KeyboardInterrupt, which also
breaks blocking calls); a READER thread receives messages, answers host replies and interrupts at once,
and queues exec/set_vars/register for the main thread; two DRAIN threads read the cell's fds 1 and 2. The
HTTP transport adds its server's request threads and one that exits when the host is gone.
"""

from __future__ import annotations

import argparse
import hmac
import ast
import builtins
import inspect
import itertools
import json
import linecache
import os
import queue
import secrets
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SERVER_FILE = os.path.abspath(__file__)
RESERVED = {"SUBMIT", "FINAL", "FINAL_VAR", "__builtins__", "__name__"}


class _Stop(BaseException):
    """Raised by SUBMIT / FINAL / FINAL_VAR: a BaseException so `except Exception` in cell code cannot
    swallow it and the cell stops at once; the namespace survives."""

    def __init__(self, kind, value):
        super().__init__(kind)
        self.kind, self.value = kind, value


class ToolError(RuntimeError):
    """A host function called from sandbox code failed on the host."""


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


# --------------------------------------------------------------------------- the channel


class StdioChannel:
    def __init__(self, fd_in, fd_out):
        self.reader = os.fdopen(fd_in, "rb", buffering=1 << 16)
        self.fd_out = fd_out
        self.lock = threading.Lock()

    def send(self, message):
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=repr).encode() + b"\n"
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd_out, view):]

    def messages(self):
        for line in self.reader:
            if line.strip():
                yield json.loads(line)


class HttpChannel:
    """The HTTP transport: the host POSTs its messages to /messages and long-polls GET /events for ours.

    Every request must carry the per-session secret (header X-Rlm-Secret; the provider's own token is
    checked by its gateway before we see anything). Retries are safe both ways: the host numbers what it
    posts (`seq`) and one already seen is acknowledged and dropped, so a retried POST after a lost response
    never runs a cell twice; we number what we send and the host asks for what comes after the last number
    it has, so a lost poll response loses nothing (acknowledged events are dropped then). A host that has
    not been heard from for `idle_exit` seconds is gone: the server exits rather than outlive it.
    """

    def __init__(self, port, secret, idle_exit=300.0):
        self.secret = secret.encode()
        self.inbox = queue.Queue()
        self.outbox = []  # [(n, message)], n increasing
        self.sent = 0
        self.seen = set()
        self.cond = threading.Condition()
        self.heard = time.monotonic()
        self.idle_exit = idle_exit
        self.httpd = ThreadingHTTPServer(("0.0.0.0", port), HttpHandler)
        self.httpd.channel = self  # what HttpHandler serves
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a dropped client is not cell output
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        threading.Thread(target=self._watch_host, daemon=True).start()

    def events_after(self, after, wait):
        """Our messages numbered above `after`, waiting up to `wait` seconds for the first one."""
        with self.cond:
            self.outbox = [item for item in self.outbox if item[0] > after]  # the host has the rest
            self.cond.wait_for(lambda: self.outbox, timeout=wait)
            return [list(item) for item in self.outbox]

    def _watch_host(self):
        while True:
            time.sleep(5)
            if time.monotonic() - self.heard > self.idle_exit:
                os._exit(0)

    def send(self, message):
        json.dumps(message, default=repr)
        with self.cond:
            self.sent += 1
            self.outbox.append((self.sent, message))
            self.cond.notify_all()

    def messages(self):
        while True:
            yield self.inbox.get()


class HttpHandler(BaseHTTPRequestHandler):
    """One request to an `HttpChannel`'s server; the channel is `self.server.channel`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms ACK wait

    def log_message(self, *args):  # fd 2 belongs to cell output
        pass

    def _reply(self, code, body):
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=repr).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _allowed(self):
        channel = self.server.channel
        given = (self.headers.get("X-Rlm-Secret") or "").encode()
        if hmac.compare_digest(given, channel.secret):
            channel.heard = time.monotonic()
            return True
        self._reply(403, {"error": "wrong or missing X-Rlm-Secret"})
        return False

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._allowed():
            return
        if urlparse(self.path).path != "/messages":
            return self._reply(404, {"error": "POST /messages only"})
        try:
            posted = json.loads(body)
            seq, message = posted["seq"], posted["message"]
        except (ValueError, KeyError, TypeError) as exc:
            return self._reply(400, {"error": "expected {seq, message}: %s" % exc})
        channel = self.server.channel
        with channel.cond:
            duplicate = seq in channel.seen
            channel.seen.add(seq)
        if not duplicate:
            channel.inbox.put(message)
        self._reply(200, {"ok": True, "duplicate": duplicate})

    def do_GET(self):
        if not self._allowed():
            return
        url = urlparse(self.path)
        if url.path != "/events":
            return self._reply(404, {"error": "GET /events only"})
        query = parse_qs(url.query)
        after = int(query.get("after", ["0"])[0])
        wait = min(float(query.get("wait", ["25"])[0]), 60.0)
        self._reply(200, {"events": self.server.channel.events_after(after, wait)})


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, channel, output_limit):
        self.channel = channel
        marker = b"\x00<rlm-cell-end-" + secrets.token_hex(8).encode() + b">\x00"
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # input() gets EOF instead of hanging the cell
        os.close(devnull)
        self.out = Capture(1, output_limit, marker)
        self.err = Capture(2, output_limit, marker)
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
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

    # -- messages from the host (reader thread)

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
        os._exit(0)  # host gone or shutdown: never outlive the session

    def _on_sigint(self, signum, frame):
        if self.in_cell:
            raise KeyboardInterrupt("interrupted by the host (cell timeout)")

    # -- calls to the host (any thread of cell code)

    def call_host(self, name, args, kwargs):
        call_id = next(self.call_ids)
        slot = [threading.Event(), None]
        try:
            message = {"type": "call", "call_id": call_id, "name": name, "args": list(args), "kwargs": kwargs}
            json.dumps(message)
        except (TypeError, ValueError) as exc:
            raise TypeError("%s(): arguments must be JSON-compatible (str, int, float, bool, list, dict, "
                            "None): %s" % (name, exc)) from None
        with self.pending_lock:
            self.pending[call_id] = slot
        try:
            self.channel.send(message)
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
        self.namespace["SUBMIT"] = self._submit
        if message.get("final"):
            self.namespace["FINAL"] = self._final
            self.namespace["FINAL_VAR"] = self._final_var

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
        error = final = value = None
        for capture in (self.out, self.err):
            capture.begin()
        self.running = message.get("id")
        started = time.perf_counter()
        try:
            tree = ast.parse(code, filename, "exec")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            body = compile(tree, filename, "exec")
            tail = compile(ast.Expression(last.value), filename, "eval") if last is not None else None
            self.in_cell = True
            try:
                exec(body, self.namespace)
                result = eval(tail, self.namespace) if tail is not None else None
            finally:
                self.in_cell = False
            if result is not None:
                value = _short_repr(result)
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
        return {"stdout": self.out.end(), "stderr": self.err.end(), "error": error, "final": final,
                "value": value, "duration_s": duration}

    def serve(self):
        handlers = {"exec": self.exec_cell, "set_vars": self.set_vars, "register": self.register}
        self.channel.send({"type": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
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
            self.channel.send(reply)


# --------------------------------------------------------------------------- helpers


def _check_name(name):
    if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
        raise ValueError("%r is not a usable name in the REPL (reserved or not an identifier)" % (name,))


def _is_json(value):
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _check_json(what, value):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError("%s values must be JSON-compatible (str, int, float, bool, list, dict, None): %s"
                        % (what, exc)) from None


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--fds", nargs=2, type=int, metavar=("IN", "OUT"))
    how.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--secret-file", help="with --http: file holding the session secret (deleted once read, "
                        "so it is not on the command line for sandbox code to read)")
    parser.add_argument("--idle-exit", type=float, default=300.0, help="with --http: exit when the host is "
                        "silent this long")
    parser.add_argument("--output-limit", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.http is not None:
        if not args.secret_file:
            parser.error("--http needs --secret-file")
        with open(args.secret_file) as handle:
            secret = handle.read().strip()
        os.unlink(args.secret_file)
        channel = HttpChannel(args.http, secret, args.idle_exit)
    else:
        channel = StdioChannel(*args.fds)
    sys.stdout.reconfigure(errors="backslashreplace", line_buffering=True)  # print and os.system stay in order
    sys.stderr.reconfigure(errors="backslashreplace")
    Server(channel, args.output_limit).serve()


if __name__ == "__main__":
    main()
