"""`python -m rlm_pipelines.viewer outputs/`: serve every run under a folder, with a run picker.

Each run folder already holds its viewer bundle (written by the pipeline; it also opens from disk). This
server adds the page that lists them: task, model, status, cost, time, newest first. Every file it reads is
hostile: a run whose run.json or summary.json cannot be read, or whose summary has a field of the wrong type,
is listed apart as broken with the reason, and the others are still served. Only regular files inside the
folder, reached through no symlink, are served, and only to requests whose Host is this machine's loopback
name or the bound host (DNS rebinding).
"""

from __future__ import annotations

import argparse
import functools
import html
import io
import json
import os
import threading
import urllib.parse
import webbrowser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rlm_pipelines.viewer.bundle import write_bundle

MAX_LISTED = 1000  # newest runs on the page; the rest are counted
# the summary fields the page shows, and the types they must have when present
FIELDS = {"task": (str,), "model": (str,), "status": (str,), "agents": (int,), "llm_calls": (int,),
          "cost_usd": (int, float), "wall_time_s": (int, float)}


def inside(root: Path, path: str | Path) -> bool:
    """`path` is a regular file under `root` (resolved), reached through no symlink at all."""
    path = os.path.abspath(path)
    return (path.startswith(str(root) + os.sep) and os.path.realpath(path) == path
            and os.path.isfile(path))


def _stamp(path: Path):
    try:
        st = path.lstat()
        return st.st_mtime_ns, st.st_size, st.st_ino
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def _read(root: Path, run_dir: Path, stamps) -> dict:
    """One run's row, or raises with the reason it is broken (cached while its files do not change)."""
    if not inside(root, run_dir / "run.json"):
        raise ValueError("run.json is not a regular file inside the folder")
    if not isinstance(json.loads((run_dir / "run.json").read_text(encoding="utf-8")), dict):
        raise ValueError("run.json is not a JSON object")
    summary = {}
    if (run_dir / "summary.json").exists() or (run_dir / "summary.json").is_symlink():
        if not inside(root, run_dir / "summary.json"):
            raise ValueError("summary.json is not a regular file inside the folder")
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("summary.json is not a JSON object")
    for key, types in FIELDS.items():
        value = summary.get(key)
        if key in summary and (not isinstance(value, types) or isinstance(value, bool)):
            raise ValueError(f"summary.json: {key} is {json.dumps(value)[:40]}, not {types[-1].__name__}")
        if key in summary and float in types:
            float(value)  # an integer too large for a float raises OverflowError: broken, not a failed page
    return {key: summary[key] for key in FIELDS if key in summary}


def runs(root: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The readable runs under `root`, newest first, and the broken ones as (path, why). The walk follows no
    symlink, goes on past folders it cannot read (listed as broken) and does not look inside a run folder."""
    root = Path(root).resolve()
    found, broken = [], []
    walk = os.walk(root, onerror=lambda e: broken.append((os.path.relpath(e.filename or root, root), str(e))))
    for folder, subfolders, files in walk:
        if "run.json" not in files:
            continue
        subfolders.clear()
        run_dir = Path(folder)
        path = str(run_dir.relative_to(root))
        try:
            row = _read(root, run_dir, (_stamp(run_dir / "run.json"), _stamp(run_dir / "summary.json")))
            if not (run_dir / "viewer").is_symlink() and not inside(root, run_dir / "viewer" / "index.html"):
                write_bundle(run_dir)  # a run from before bundles existed, or one that was interrupted
            found.append({"path": path, **row, "mtime": (run_dir / "run.json").stat().st_mtime})
        except Exception as error:  # noqa: BLE001 - whatever a hostile file does, the other runs are served
            broken.append((path, f"{type(error).__name__}: {error}"[:300]))
    return sorted(found, key=lambda r: r["mtime"], reverse=True), sorted(broken)


def _cell(value, form: str = "{}") -> str:
    return "<td></td>" if value is None else f"<td>{html.escape(form.format(value))}</td>"


def picker(root: Path) -> str:
    found, broken = runs(root)
    rows = "".join(
        f"<tr><td><a href='/{html.escape(urllib.parse.quote(r['path']))}/viewer/index.html'>"
        f"{html.escape(r['path'])}</a></td>{_cell(r.get('task'))}{_cell(r.get('model'))}"
        f"{_cell(r.get('status', '?'))}{_cell(r.get('agents'))}{_cell(r.get('llm_calls'))}"
        f"{_cell(r.get('cost_usd', 0), '${:.4f}')}{_cell(r.get('wall_time_s', 0), '{:.1f} s')}</tr>"
        for r in found[:MAX_LISTED])
    more = f"<p>and {len(found) - MAX_LISTED} older runs not listed</p>" if len(found) > MAX_LISTED else ""
    bad = "".join(f"<li>broken: {html.escape(path)} — {html.escape(why)}</li>" for path, why in broken)
    return ("<!doctype html><meta charset='utf-8'><title>rlm-pipelines runs</title>"
            "<style>body{font:14px system-ui;margin:20px}td,th{padding:4px 10px;text-align:left}"
            "tr:nth-child(even){background:#f4f4f4}</style>"
            f"<h1>Runs under {html.escape(str(root))}</h1><table id='runs'><tr><th>run</th><th>task</th>"
            f"<th>model</th><th>status</th><th>agents</th><th>llm calls</th><th>dollars</th><th>wall time</th>"
            f"</tr>{rows}</table>{more}" + (f"<h2>Broken runs</h2><ul id='broken'>{bad}</ul>" if bad else ""))


def allowed_host(host: str | None, names: set[str]) -> bool:
    """The Host header names this machine's loopback or one of `names` (the bound host), with any port."""
    host = (host or "").lower()
    if host.startswith("[") and "]" in host:
        end = host.index("]") + 1
        name, port = host[:end], host[end:]
    else:
        name, colon, port = host.partition(":")
        port = colon + port
    if port and not (port[0] == ":" and port[1:].isascii() and port[1:].isdigit()):
        return False
    bound = {n.lower() for n in names if n} | {f"[{n.lower()}]" for n in names if ":" in n}
    return name in {"127.0.0.1", "localhost", "[::1]", *bound}


class Handler(SimpleHTTPRequestHandler):
    """The picker at `/`, and the files under `root`; `host` is the --host the server was bound to."""

    def __init__(self, *args, root: Path, host: str = "127.0.0.1", **kwargs):
        self.root = Path(root).resolve()
        self.bound = host
        super().__init__(*args, directory=str(self.root), **kwargs)

    def send_head(self):
        """Serve only a regular file inside the root reached through no symlink; a folder means its index.html."""
        if not allowed_host(self.headers.get("Host"), {self.bound, self.server.server_address[0]}):
            self.send_error(403, "this server answers only to 127.0.0.1, localhost, [::1] or its bound host")
            return None
        if urllib.parse.urlsplit(self.path).path in ("/", "/index.html"):
            body = picker(self.root).encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)
        path = self.translate_path(self.path)
        if os.path.isdir(path) and not os.path.islink(path):
            path = os.path.join(path, "index.html")
        if not inside(self.root, path):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def end_headers(self) -> None:
        self.send_header("x-content-type-options", "nosniff")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


def open_browser(url: str) -> None:
    try:
        opened, why = webbrowser.open(url), "no browser found, or it failed (set BROWSER to choose one)"
    except Exception as error:  # noqa: BLE001 - said plainly, the server goes on
        opened, why = False, f"{type(error).__name__}: {error}"
    if not opened:
        print(f"could not open a browser: {why}; open {url} by hand", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the runs under a folder with a run picker.")
    parser.add_argument("folder", nargs="?", default="outputs")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--open", action="store_true", help="open the picker in a browser")
    args = parser.parse_args()
    root = Path(args.folder).resolve()
    if not root.is_dir():
        raise SystemExit(f"error: {args.folder!r} is not a folder; give the outputs folder of your runs")
    server = ThreadingHTTPServer((args.host, args.port), functools.partial(Handler, root=root, host=args.host))
    url = f"http://{args.host}:{server.server_address[1]}/"
    found, broken = runs(root)
    print(f"serving {len(found)} runs under {root} at {url} (Ctrl-C to stop)", flush=True)
    for path, why in broken:
        print(f"broken: {path} — {why}", flush=True)
    if args.open:  # in a thread: a console browser would otherwise hold the server up until it quits
        threading.Thread(target=open_browser, args=(url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
