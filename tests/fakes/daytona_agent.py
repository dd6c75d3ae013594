"""The fake Daytona's in-sandbox daemon (what Daytona's own daemon does in a real sandbox): runs session
commands and forwards preview requests to ports inside the sandbox.

It runs inside a LocalSandbox (bubblewrap, its own network namespace), so session commands and the ports
they listen on share one network namespace, like a container's. It serves HTTP on a listening unix
socket the host made and passed in as an inherited fd: unix sockets cross network namespaces, TCP does not.
Stdlib only.
"""

import http.client
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler

LOGS = "/tmp/.fake-daytona"
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
commands = {}  # cmd_id -> (session, Popen)
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self):
        if self.path.startswith("/port/"):
            return self._forward()
        body = json.loads(self._body() or b"{}") if self.command == "POST" else {}
        if self.path == "/session/start":
            os.makedirs(LOGS, exist_ok=True)
            out = open(os.path.join(LOGS, body["cmd_id"] + ".out"), "wb")
            err = open(os.path.join(LOGS, body["cmd_id"] + ".err"), "wb")
            proc = subprocess.Popen(["/bin/sh", "-c", body["command"]], stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            out.close(), err.close()
            with lock:
                commands[body["cmd_id"]] = (body["session"], proc)
            return self._json(200, {"ok": True})
        if self.path.startswith("/session/status/"):
            cmd_id = self.path.rsplit("/", 1)[1]
            with lock:
                entry = commands.get(cmd_id)
            if entry is None:
                return self._json(404, {"message": "no such command"})
            logs = {}
            for stream in ("out", "err"):
                with open(os.path.join(LOGS, cmd_id + "." + stream), "rb") as handle:
                    logs[stream] = handle.read().decode(errors="replace")
            return self._json(200, {"exit_code": entry[1].poll(), "stdout": logs["out"], "stderr": logs["err"]})
        if self.path == "/session/kill":
            with lock:
                procs = [p for s, p in commands.values() if s == body["session"]]
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            return self._json(200, {"killed": len(procs)})
        return self._json(404, {"message": "unknown agent path " + self.path})

    def _forward(self):
        """/port/{port}/{rest}: the request, as is, to 127.0.0.1:{port} inside the sandbox."""
        _, _, port, rest = self.path.split("/", 3)
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=120)
        try:
            connection.request(self.command, "/" + rest, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as exc:  # nothing listens (yet): what a gateway says
            return self._json(502, {"message": "bad gateway: %s" % exc})
        finally:
            connection.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _any


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hung up (a killed server's poll)
        pass


def main():
    listener = socket.socket(fileno=int(sys.argv[1]))
    server = Server(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.serve_forever()


if __name__ == "__main__":
    main()
