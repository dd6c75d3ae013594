"""`python -m rlm_pipelines.viewer outputs/`: serve every run under a folder, with a run picker.

Each run folder already holds its viewer bundle (written by the pipeline; it also opens from disk). This
server adds the page that lists them: task, model, status, cost, time, newest first.
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import webbrowser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rlm_pipelines.viewer.bundle import write_bundle


def runs(root: Path) -> list[dict]:
    found = []
    for tree in root.rglob("run.json"):
        run_dir = tree.parent
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if not (run_dir / "viewer" / "index.html").is_file():
            write_bundle(run_dir)  # a run from before bundles existed, or one that was interrupted
        found.append({"path": str(run_dir.relative_to(root)), **summary,
                      "mtime": tree.stat().st_mtime})
    return sorted(found, key=lambda r: r["mtime"], reverse=True)


def picker(root: Path) -> str:
    rows = "".join(
        f"<tr><td><a href='{html.escape(r['path'])}/viewer/index.html'>{html.escape(r['path'])}</a></td>"
        f"<td>{html.escape(str(r.get('task', '')))}</td><td>{html.escape(str(r.get('model', '')))}</td>"
        f"<td>{html.escape(str(r.get('status', '?')))}</td><td>{r.get('agents', '')}</td>"
        f"<td>{r.get('llm_calls', '')}</td><td>${float(r.get('cost_usd') or 0):.4f}</td>"
        f"<td>{float(r.get('wall_time_s') or 0):.1f} s</td></tr>" for r in runs(root))
    return ("<!doctype html><meta charset='utf-8'><title>rlm-pipelines runs</title>"
            "<style>body{font:14px system-ui;margin:20px}td,th{padding:4px 10px;text-align:left}"
            "tr:nth-child(even){background:#f4f4f4}</style>"
            f"<h1>Runs under {html.escape(str(root))}</h1><table id='runs'><tr><th>run</th><th>task</th>"
            f"<th>model</th><th>status</th><th>agents</th><th>llm calls</th><th>dollars</th><th>wall time</th>"
            f"</tr>{rows}</table>")


class Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, root: Path, **kwargs):
        self.root = root
        super().__init__(*args, directory=str(root), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path in ("/", "/index.html"):
            body = picker(self.root).encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


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
    server = ThreadingHTTPServer((args.host, args.port), functools.partial(Handler, root=root))
    url = f"http://{args.host}:{server.server_address[1]}/"
    print(f"serving {len(runs(root))} runs under {root} at {url} (Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
