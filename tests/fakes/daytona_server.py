"""A local fake of the Daytona API, for the real `daytona` SDK (0.226.1) to talk to via DAYTONA_API_URL.

Each fake sandbox is a real LocalSandbox (bubblewrap) running `daytona_agent.py`, like Daytona's daemon in
a container: commands run in it, files land in it, its ports are reached through preview URLs. Only the
wire format is Daytona's; the isolation is ours.

Endpoints implemented (what the SDK calls for our DaytonaSandbox and the clean-up command; ENDPOINTS
below is the list, and `fake.calls` records every request as (method, endpoint)):
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

import http.client

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.sandbox.local import LocalSandbox

AGENT = Path(__file__).resolve().with_name("daytona_agent.py")

ENDPOINTS = [
    ("POST", "/api/sandbox"),                                  # create
    ("GET", "/api/sandbox"),                                   # list (labels filter, cursor)
    ("GET", "/api/sandbox/{id}"),                              # get / refresh / wait for state
    ("DELETE", "/api/sandbox/{id}"),                           # delete
    ("POST", "/api/sandbox/{id}/fork"),                        # fork (a copy of its files)
    ("PUT", "/api/sandbox/{id}/labels"),                       # set labels
    ("POST", "/api/sandbox/{id}/network-settings"),            # block / open the network
    ("GET", "/api/sandbox/{id}/toolbox-proxy-url"),
    ("GET", "/api/sandbox/{id}/ports/{port}/preview-url"),     # preview link + token
    ("POST", "/toolbox/{id}/process/execute"),                 # process.exec
    ("POST", "/toolbox/{id}/process/session"),                 # create_session
    ("POST", "/toolbox/{id}/process/session/{sid}/exec"),      # execute_session_command (async)
    ("GET", "/toolbox/{id}/process/session/{sid}/command/{cid}"),       # get_session_command
    ("GET", "/toolbox/{id}/process/session/{sid}/command/{cid}/logs"),  # get_session_command_logs
    ("DELETE", "/toolbox/{id}/process/session/{sid}"),         # delete_session (kills its commands)
    ("POST", "/toolbox/{id}/files/bulk-upload"),               # fs.upload_file(s) (multipart)
    ("POST", "/toolbox/{id}/files/bulk-download"),             # fs.download_file(s) (multipart reply)
    ("POST", "/toolbox/{id}/git/clone"),                       # git.clone(url, path, branch, commit_id)
    ("*", "/preview/{id}/{port}/..."),                         # the preview URL of a port
]
__doc__ += "\n".join(f"    {method:6} {path}" for method, path in ENDPOINTS) + "\n"
_ROUTES = [(m, re.compile("^" + re.sub(r"\\\{[a-z]+\\\}", "([^/]+)", re.escape(p)).replace(r"/\.\.\.", "(/.*)?")
                          + "$"), p) for m, p in ENDPOINTS]


class FakeSandbox:
    def __init__(self, request: dict[str, Any], root: Path):
        self.id = uuid.uuid4().hex[:12]
        self.request = request
        self.labels: dict[str, str] = dict(request.get("labels") or {})
        self.network_block_all = bool(request.get("networkBlockAll"))
        self.network_history: list[dict[str, Any]] = []
        self.token = secrets.token_urlsafe(16)
        self.created_at = datetime.now(timezone.utc).isoformat()
        self.box = LocalSandbox(LocalSandboxConfig(isolation="bwrap", network=False, env=request.get("env") or {},
                                              root_dir=str(root), memory_mb=4096),
                                name="fake-daytona", mounts={str(AGENT.parent): "/.fake"})
        self.box.start()
        self.socket_path = str(Path(self.box.root) / "agent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(64)
        try:
            self.agent = self.box._popen([sys.executable, "-I", "/.fake/daytona_agent.py", str(listener.fileno())],
                                         pass_fds=(listener.fileno(),), stdout=subprocess.DEVNULL)
        finally:
            listener.close()
        self.commands: dict[str, dict[str, str]] = {}  # cmd id -> {session, command}

    def agent_request(self, method: str, path: str, body: Optional[bytes] = None,
                      headers: Optional[dict[str, str]] = None) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = _UnixHTTPConnection(self.socket_path)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def agent_json(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        status, _, data = self.agent_request(method, path, json.dumps(body or {}).encode(),
                                             {"Content-Type": "application/json"})
        return status, json.loads(data or b"{}")

    def dto(self, base: str) -> dict[str, Any]:
        r = self.request
        return {"id": self.id, "organizationId": "fake-org", "name": r.get("name") or self.id,
                "user": r.get("user") or "daytona", "env": r.get("env") or {}, "labels": self.labels,
                "public": bool(r.get("public")), "networkBlockAll": self.network_block_all, "kvm": False,
                "target": r.get("target") or "us", "cpu": r.get("cpu") or 1, "gpu": 0,
                "memory": r.get("memory") or 1, "disk": r.get("disk") or 3, "state": "started",
                "snapshot": r.get("snapshot"), "toolboxProxyUrl": f"{base}/toolbox",
                "autoStopInterval": r.get("autoStopInterval"), "autoDeleteInterval": r.get("autoDeleteInterval"),
                "createdAt": self.created_at, "updatedAt": self.created_at}

    def delete(self) -> None:
        self.box.stop()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=180)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


class _Handler(BaseHTTPRequestHandler):
    """Every request goes to `FakeDaytona.handle` of the fake that is `self.server.fake`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms ACK wait

    def log_message(self, *args: Any) -> None:
        pass

    def handle_one(self) -> None:
        self.server.fake.handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = handle_one


class FakeDaytona:
    """`with FakeDaytona() as fake:` serves on 127.0.0.1; `fake.api_url`, `fake.api_key` for the SDK."""

    def __init__(self) -> None:
        self.api_key = "fake-" + secrets.token_hex(8)
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.deleted: list[FakeSandbox] = []
        self.calls: list[tuple[str, str]] = []
        self.uploads: list[tuple[str, str, int]] = []  # (sandbox id, path, bytes)
        self.forks: list[tuple[str, str]] = []  # (parent id, child id)
        # per preview request: "before" (502, not forwarded), "reset" (connection dropped, not forwarded)
        # or "after" (forwarded, then its answer lost: 504)
        self.preview_faults: list[str] = []
        self.clone_error: Optional[str] = None  # set: git clone fails with this message
        self.network_locked = False  # set: runtime network changes are refused, as for Daytona tiers 1-2
        self.lock = threading.Lock()
        self.root = Path(tempfile.mkdtemp(prefix="fake-daytona-"))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.fake = self  # what _Handler serves
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.api_url = self.base + "/api"

    def __enter__(self) -> "FakeDaytona":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        for sandbox in list(self.sandboxes.values()):
            sandbox.delete()
        self.sandboxes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- dispatch

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        for method, pattern, name in _ROUTES:
            match = pattern.match(url.path)
            if match and method in ("*", h.command):
                break
        else:
            return _send(h, 404, {"message": f"the fake Daytona has no {h.command} {url.path}"})
        with self.lock:
            self.calls.append((h.command, name))
        args = [a for a in match.groups() if a is not None]
        if name.startswith("/preview/"):
            return self.preview(h, body, *args)
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _send(h, 401, {"message": "Unauthorized: wrong API key", "statusCode": 401})
        sandbox = None
        if args and not (h.command == "POST" and name == "/api/sandbox"):
            sandbox = self.sandboxes.get(args[0])
            if sandbox is None:
                return _send(h, 404, {"message": f"Sandbox with ID or name {args[0]} not found", "statusCode": 404})
        handler = getattr(self, "_" + re.sub(r"\W+", "_", f"{h.command} {name}").strip("_").lower())
        try:
            handler(h, url, body, sandbox, *args[1:])
        except Exception as exc:  # a fake bug must be loud, not a hang
            _send(h, 500, {"message": f"fake Daytona error: {type(exc).__name__}: {exc}"})
            raise

    # -- the API

    def _post_api_sandbox(self, h, url, body, _):
        sandbox = FakeSandbox(json.loads(body), self.root)
        with self.lock:
            self.sandboxes[sandbox.id] = sandbox
        _send(h, 200, sandbox.dto(self.base))

    def _get_api_sandbox(self, h, url, body, _):
        query = parse_qs(url.query)
        wanted = json.loads(query["labels"][0]) if "labels" in query else {}
        items = [s.dto(self.base) for s in list(self.sandboxes.values())
                 if all(s.labels.get(k) == v for k, v in wanted.items())]
        _send(h, 200, {"items": items, "nextCursor": None})

    def _get_api_sandbox_id(self, h, url, body, sandbox):
        _send(h, 200, sandbox.dto(self.base))

    def _delete_api_sandbox_id(self, h, url, body, sandbox):
        with self.lock:
            self.sandboxes.pop(sandbox.id, None)
            self.deleted.append(sandbox)
        sandbox.delete()
        _send(h, 200, {**sandbox.dto(self.base), "state": "destroyed"})

    def _post_api_sandbox_id_fork(self, h, url, body, sandbox):
        child = FakeSandbox({**sandbox.request, "labels": sandbox.labels}, self.root)
        child.network_block_all = sandbox.network_block_all
        source, target = Path(sandbox.box.root) / "workspace", Path(child.box.root) / "workspace"
        subprocess.run(["cp", "-a", f"{source}/.", str(target)], check=True)
        if child.box._uid is not None:
            subprocess.run(["chown", "-R", f"{child.box._uid}:{child.box._uid}", str(target)], check=True)
        with self.lock:
            self.sandboxes[child.id] = child
            self.forks.append((sandbox.id, child.id))
        _send(h, 200, child.dto(self.base))

    def _put_api_sandbox_id_labels(self, h, url, body, sandbox):
        sandbox.labels = dict(json.loads(body)["labels"])
        _send(h, 200, {"labels": sandbox.labels})

    def _post_api_sandbox_id_network_settings(self, h, url, body, sandbox):
        if self.network_locked:
            return _send(h, 403, {"message": "Updating network settings is available for Tier 3 and above",
                                  "statusCode": 403})
        settings = json.loads(body)
        sandbox.network_history.append(settings)
        if "networkBlockAll" in settings:
            sandbox.network_block_all = bool(settings["networkBlockAll"])
        elif settings.get("networkAllowList"):
            sandbox.network_block_all = False
        _send(h, 200, sandbox.dto(self.base))

    def _get_api_sandbox_id_toolbox_proxy_url(self, h, url, body, sandbox):
        _send(h, 200, {"url": f"{self.base}/toolbox"})

    def _get_api_sandbox_id_ports_port_preview_url(self, h, url, body, sandbox, port):
        _send(h, 200, {"sandboxId": sandbox.id, "url": f"{self.base}/preview/{sandbox.id}/{port}",
                       "token": sandbox.token})

    # -- the toolbox

    def _post_toolbox_id_process_execute(self, h, url, body, sandbox):
        request = json.loads(body)
        timeout = request.get("timeout") or None
        try:
            code, out = sandbox.box.run(request["command"], cwd=request.get("cwd"), timeout=timeout)
        except Exception as exc:
            return _send(h, 400, {"message": str(exc)})
        if code == 124 and timeout:
            return _send(h, 408, {"message": "command execution timeout", "statusCode": 408})
        _send(h, 200, {"exitCode": code, "result": out})

    def _post_toolbox_id_process_session(self, h, url, body, sandbox):
        _send(h, 201, {})

    def _post_toolbox_id_process_session_sid_exec(self, h, url, body, sandbox, session):
        request = json.loads(body)
        cmd_id = uuid.uuid4().hex[:12]
        sandbox.commands[cmd_id] = {"session": session, "command": request["command"]}
        status, reply = sandbox.agent_json("POST", "/session/start", {"session": session, "cmd_id": cmd_id,
                                                                      "command": request["command"]})
        if status != 200:
            return _send(h, 500, {"message": f"agent: {reply}"})
        _send(h, 200, {"cmdId": cmd_id})

    def _command_state(self, sandbox: FakeSandbox, cmd_id: str) -> dict:
        status, reply = sandbox.agent_json("GET", f"/session/status/{cmd_id}")
        if status != 200:
            raise KeyError(cmd_id)
        return reply

    def _get_toolbox_id_process_session_sid_command_cid(self, h, url, body, sandbox, session, cmd_id):
        state = self._command_state(sandbox, cmd_id)
        _send(h, 200, {"id": cmd_id, "command": sandbox.commands[cmd_id]["command"], "exitCode": state["exit_code"]})

    def _get_toolbox_id_process_session_sid_command_cid_logs(self, h, url, body, sandbox, session, cmd_id):
        state = self._command_state(sandbox, cmd_id)
        _send(h, 200, {"output": state["stdout"] + state["stderr"], "stdout": state["stdout"],
                       "stderr": state["stderr"]})

    def _delete_toolbox_id_process_session_sid(self, h, url, body, sandbox, session):
        sandbox.agent_json("POST", "/session/kill", {"session": session})
        _send(h, 204, None)

    def _post_toolbox_id_files_bulk_upload(self, h, url, body, sandbox):
        from python_multipart import MultipartParser  # which the SDK itself depends on

        fields: dict[str, bytes] = {}
        current: dict[str, Any] = {}

        def on_part_begin():
            current.clear()
            current["data"] = bytearray()

        def on_header_field(data, start, end):
            current["field"] = data[start:end].decode().lower()

        def on_header_value(data, start, end):
            if current.get("field") == "content-disposition":
                found = re.search(r'name="([^"]+)"', data[start:end].decode())
                current["name"] = found.group(1) if found else ""

        def on_part_data(data, start, end):
            current["data"] += data[start:end]

        def on_part_end():
            fields[current.get("name", "")] = bytes(current["data"])

        boundary = re.search(r"boundary=([^;]+)", h.headers["Content-Type"]).group(1).strip('"')
        parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                            "on_header_value": on_header_value, "on_part_data": on_part_data,
                                            "on_part_end": on_part_end})
        parser.write(body)
        parser.finalize()
        index = 0
        while f"files[{index}].path" in fields:
            path, data = fields[f"files[{index}].path"].decode(), fields[f"files[{index}].file"]
            sandbox.box.upload(path, data)
            with self.lock:
                self.uploads.append((sandbox.id, path, len(data)))
            index += 1
        _send(h, 200, {})

    def _post_toolbox_id_files_bulk_download(self, h, url, body, sandbox):
        boundary = "fake" + secrets.token_hex(8)
        parts = []
        for path in json.loads(body)["paths"]:
            try:
                data, name, kind = sandbox.box.download(path), "file", "application/octet-stream"
            except Exception as exc:
                data = json.dumps({"message": f"{type(exc).__name__}: {exc}", "statusCode": 404}).encode()
                name, kind = "error", "application/json"
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path}"\r\n'
                         f'Content-Type: {kind}\r\n\r\n'.encode() + data + b"\r\n")
        payload = b"".join(parts) + f"--{boundary}--\r\n".encode()
        h.send_response(200)
        h.send_header("Content-Type", f"multipart/form-data; boundary={boundary}")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _post_toolbox_id_git_clone(self, h, url, body, sandbox):
        """Cloned by the fake on the host into the sandbox's folder (its sandbox has no network, and the
        test repos are host paths), then handed to the sandbox's user, as Daytona's daemon would."""
        request = json.loads(body)
        if self.clone_error:
            return _send(h, 400, {"message": self.clone_error, "statusCode": 400})
        source = request["url"].removeprefix("file://")
        target = sandbox.box._host_path(request["path"])
        args = ["git", "clone", "--quiet"] + (["--branch", request["branch"]] if request.get("branch") else [])
        done = subprocess.run(args + [source, str(target)], capture_output=True, text=True)
        if done.returncode == 0 and request.get("commitId"):
            done = subprocess.run(["git", "-C", str(target), "checkout", "--quiet", "--detach", request["commitId"]],
                                  capture_output=True, text=True)
        if done.returncode != 0:
            return _send(h, 400, {"message": f"git clone failed: {done.stderr.strip()}", "statusCode": 400})
        if sandbox.box._uid is not None:
            subprocess.run(["chown", "-R", f"{sandbox.box._uid}:{sandbox.box._uid}", str(target)], check=True)
        _send(h, 200, {})

    # -- preview URLs

    def preview(self, h: BaseHTTPRequestHandler, body: bytes, sandbox_id: str, port: str, rest: str = "") -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            return _send(h, 404, {"message": "no such sandbox"})
        if h.headers.get("X-Daytona-Preview-Token") != sandbox.token:
            return _send(h, 401, {"message": "preview token missing or wrong"})
        with self.lock:
            fault = self.preview_faults.pop(0) if self.preview_faults else None
        if fault == "before":
            return _send(h, 502, {"message": "injected: bad gateway"})
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        query = ("?" + urlparse(h.path).query) if urlparse(h.path).query else ""
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        status, reply_headers, data = sandbox.agent_request(h.command, f"/port/{port}{rest or '/'}{query}",
                                                            body or None, headers)
        if fault == "after":  # the request reached the server; its response is lost on the way back
            return _send(h, 504, {"message": "injected: gateway timeout"})
        h.send_response(status)
        for key, value in reply_headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _send(h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    h.send_response(status)
    if body is not None:
        h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


if __name__ == "__main__":  # python tests/fakes/daytona_server.py: serve until Ctrl-C, for trying things by hand
    with FakeDaytona() as fake:
        print(f"DAYTONA_API_URL={fake.api_url} DAYTONA_API_KEY={fake.api_key}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
