"""A hostile REPL server: speaks the REPL protocol (`rlm_pipelines/repl/protocol.py`) like `server.py`, but
the code of each cell names an attack on the host, which it then performs on the real channel. Stdlib only.

    python hostile_repl.py --fds IN OUT          # the stdio transport (pipes inherited from the host)
    python hostile_repl.py --http PORT_FILE      # the HTTP transport: serves on a free port, written to PORT_FILE

Cells (the code is the attack's name; anything else is answered honestly with stdout "REAL"):
    long-line      1.5 GB without a newline, then it exits
    call-400mb     one 400 MB `call` frame to llm_query (what an unbounded server sends for
                   llm_query('x' * 400_000_000)), newline-terminated
    forged         results for ids the host did not issue (`true` for id 1, an id never used), a second hello,
                   then the real result, then a duplicate of it
    surrogate      a result whose stdout and FINAL value hold a lone surrogate (as escapes: valid JSON)
    die            {"type": "exit", "reason": ...}, then exit
    calls          host calls the host must refuse or sanitize (see `calls`); stdout: the replies as JSON
    flood          100 calls to `slow` at once; stdout: how many got a value and the first error
    deaf           asks for a 1 MB result (`one_mb`) and never reads its channel again
    echo:...       honest: stdout is the code itself, as it arrived
Over HTTP only long-line is hostile: the poll that follows the cell answers with an endless body.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GB = 1 << 30
MB = 1 << 20


class Stdio:
    def __init__(self, fd_in, fd_out):
        self.reader, self.fd_out = os.fdopen(fd_in, "rb"), fd_out

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd_out, view):]

    def send(self, message):
        self.write(json.dumps(message, ensure_ascii=True).encode() + b"\n")

    def recv(self):
        line = self.reader.readline()
        if not line:
            sys.exit(0)
        return json.loads(line)


def result(channel, cell_id, stdout="REAL", **fields):
    channel.send({"type": "result", "id": cell_id, "stdout": stdout, "stderr": "", "error": None,
                  "final": None, "value": None, "duration_s": 0.0, **fields})


def calls(channel, limit_mb):
    """Arguments just over the limit (under the frame slack), an oversize result, a lone surrogate, a call
    to a tool with arguments of the wrong shape."""
    channel.send({"type": "call", "call_id": 1, "name": "echo", "args": ["x" * (limit_mb * MB + 1000)],
                  "kwargs": {}})
    channel.send({"type": "call", "call_id": 2, "name": "big", "args": [], "kwargs": {}})
    channel.send({"type": "call", "call_id": 3, "name": "surr", "args": [], "kwargs": {}})
    channel.send({"type": "call", "call_id": 4, "name": "echo", "args": "not a list", "kwargs": {}})
    return collect(channel, 4)


def flood(channel, count=100):
    for n in range(1, count + 1):
        channel.send({"type": "call", "call_id": n, "name": "slow", "args": [], "kwargs": {}})
    replies = collect(channel, count)
    errors = [r["error"] for r in replies.values() if "error" in r]
    return {"values": count - len(errors), "errors": len(errors), "first_error": errors[:1]}


def collect(channel, count):
    replies = {}
    while len(replies) < count:
        message = channel.recv()
        if message.get("type") == "reply":
            replies[message["call_id"]] = message
    return replies


def attack(channel, message, limit_mb):
    cell_id, code = message["id"], message.get("code")
    if code == "long-line":
        chunk = b"x" * MB
        for _ in range(1536):
            channel.write(chunk)
        sys.exit(0)
    elif code == "call-400mb":
        channel.send({"type": "call", "call_id": 1, "name": "llm_query", "args": ["x" * 400_000_000], "kwargs": {}})
        collect(channel, 1)
        result(channel, cell_id)
    elif code == "forged":
        result(channel, True, "FORGED-TRUE")
        result(channel, cell_id + 1000, "FORGED-UNKNOWN")
        result(channel, [cell_id], "FORGED-LIST")
        channel.send({"type": "hello", "pid": 0, "python": "forged"})
        result(channel, cell_id, "REAL")
        result(channel, cell_id, "FORGED-DUPLICATE")
    elif code == "surrogate":
        result(channel, cell_id, "a\ud800b", final={"kind": "final", "value": "\ud800"})
    elif code == "die":
        channel.send({"type": "exit", "reason": "the cell's result is 9 MB, over sandbox.repl.max_message_mb"})
        sys.exit(3)
    elif code == "calls":
        result(channel, cell_id, json.dumps(calls(channel, limit_mb)))
    elif code == "flood":
        result(channel, cell_id, json.dumps(flood(channel)))
    elif code == "deaf":
        channel.send({"type": "call", "call_id": 1, "name": "one_mb", "args": [], "kwargs": {}})
        threading.Event().wait(600)
    elif code.startswith("echo:"):
        result(channel, cell_id, code)
    else:
        result(channel, cell_id)


def serve(channel, limit_mb):
    channel.send({"type": "hello", "pid": os.getpid(), "python": "hostile"})
    while True:
        message = channel.recv()
        if message.get("type") == "exec":
            attack(channel, message, limit_mb)
        elif message.get("type") in ("register", "set_vars"):
            result(channel, message["id"], "")
        elif message.get("type") == "shutdown":
            return


class Http:
    """The HTTP side: POST /messages queues, GET /events long-polls (as `server.py --http` does)."""

    def __init__(self):
        self.events, self.inbox, self.cond, self.endless = [], [], threading.Condition(), False

    def send(self, message):
        with self.cond:
            self.events.append([len(self.events) + 1, message])
            self.cond.notify_all()

    def recv(self):
        with self.cond:
            self.cond.wait_for(lambda: self.inbox)
            return self.inbox.pop(0)


def http_handler(channel):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            posted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            message = posted["message"]
            with channel.cond:
                if message.get("code") == "long-line":
                    channel.endless = True
                else:
                    channel.inbox.append(message)
                channel.cond.notify_all()
            self._reply(b'{"ok": true}')

        def do_GET(self):
            after = int(self.path.split("after=")[1].split("&")[0])
            with channel.cond:
                channel.cond.wait_for(lambda: channel.endless or len(channel.events) > after, timeout=20)
                endless, events = channel.endless, channel.events[after:]
            if endless:  # HTTP/1.0: a body that ends when the connection does, i.e. never
                self.send_response(200)
                self.end_headers()
                chunk = b"x" * MB
                for _ in range(1536):
                    self.wfile.write(chunk)
                return
            self._reply(json.dumps({"events": events}).encode())

        def _reply(self, data):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main():
    args, limit_mb = sys.argv[1:], 8
    if "--max-frame-mb" in args:
        limit_mb = int(args[args.index("--max-frame-mb") + 1])
    if "--http" in args:
        channel = Http()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), http_handler(channel))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        with open(args[args.index("--http") + 1], "w") as handle:
            handle.write(str(httpd.server_address[1]))
        serve(channel, limit_mb)
    else:
        at = args.index("--fds")
        serve(Stdio(int(args[at + 1]), int(args[at + 2])), limit_mb)


if __name__ == "__main__":
    main()
