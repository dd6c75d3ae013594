"""The viewer in a real headless Chromium (Debian's), over file:// bundles of real runs and the run picker;
and the attacks a hostile run folder can make on both, performed for real."""

import base64
import contextlib
import http.client
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import pytest

from rlm_pipelines.viewer import write_bundle
from tests.conftest import BOOK, PROJECT, free_port, run_scripted
from tests.fixtures.todo_repo import TODOS, build

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (bash scripts/install.sh installs it)", allow_module_level=True)


def run(run_dir, *overrides):
    return run_scripted(run_dir, *overrides)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    os.environ["RLM_CACHE_DIR"] = str(root / "cache")
    repo = build(tmp_path_factory.mktemp("repo"))
    assert run(root / "runs" / "repo", "task=repo_todos", f"task.repo={repo['path']}")["status"] == "ok"
    assert run(root / "runs" / "book", f"task.source={BOOK}")["status"] == "ok"
    return root


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--allow-file-access-from-files"])
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#stats .stat")
    return page, errors


def test_repo_run_bundle_from_disk(browser, runs):
    page, errors = open_page(browser, f"file://{runs}/runs/repo/viewer/index.html")
    assert errors == []
    assert page.locator("#tree .node").count() == 1 + 3 + TODOS
    assert "9" in page.locator("#stats").inner_text()
    assert "ok" in page.locator("#stats").inner_text()
    page.locator("#tree .node[data-id='a1']").click()  # a child: its iterations are shown
    assert page.locator("#agent h2").first.inner_text().lower().startswith("agent a1")
    assert page.locator("#iterations .iteration").count() == 2
    spawned = page.locator("#iterations .child-link")
    assert spawned.count() >= 1  # the children this iteration spawned, from the recorded ids
    first_child = spawned.first.inner_text()
    spawned.first.click()
    assert first_child.lower() in page.locator("#agent h2").first.inner_text().lower()
    assert page.locator("#patch .add").count() >= 1
    assert page.locator("#patch .del").count() >= 1
    assert page.locator("#timeline .bar").count() == 1 + 3 + TODOS
    page.fill("#search", "checkout at")
    assert page.locator("mark").count() >= 1


def test_monte_cristo_bundle_shows_llm_calls_and_the_plot(browser, runs):
    page, errors = open_page(browser, f"file://{runs}/runs/book/viewer/index.html")
    assert errors == []
    assert page.locator("#tree .node").count() == 1
    assert page.locator("#calls .call").count() == 39
    assert page.locator("#iterations .iteration").count() == 4
    width = page.eval_on_selector("img.plot", "img => img.complete && img.naturalWidth")
    assert width
    assert width > 1000


def test_unknown_schema_is_said_plainly(browser, runs, tmp_path):
    shutil.copytree(runs / "runs" / "repo" / "viewer", tmp_path / "viewer")
    data = (tmp_path / "viewer" / "data.js").read_text().replace("rlm-pipelines/run@1", "rlm-pipelines/run@9", 1)
    (tmp_path / "viewer" / "data.js").write_text(data)
    page, errors = open_page(browser, f"file://{tmp_path}/viewer/index.html")
    assert "this viewer knows" in page.locator("#banner").inner_text()
    assert errors == []


def test_the_picker_serves_every_run(browser, runs):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rlm_pipelines.viewer", str(runs / "runs"), "--port", str(port)],
                              env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert "serving 2 runs" in server.stdout.readline()
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        assert page.locator("#runs tr").count() == 3  # header + two runs
        page.locator("#runs a", has_text="repo").click()
        page.wait_for_selector("#tree .node")
        assert page.locator("#tree .node").count() == 1 + 3 + TODOS
    finally:
        server.kill()
        server.wait()


# --- attacks: every field of run.json / summary.json and every file of a run folder is hostile ---------------

PAYLOAD = "<img src=x onerror=window.__pwned=1>\"><svg onload=window.__pwned=1>' onmouseover='window.__pwned=1"
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
                       "RU5ErkJggg==")  # 1x1 pixel


@contextlib.contextmanager
def picker_server(root, *args, env=None):
    """`python -m rlm_pipelines.viewer root` on a free port; yields (port, lines), lines a queue of its output."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rlm_pipelines.viewer", str(root), "--port", str(port), *args],
                              env={**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
    try:
        yield port, lines
    finally:
        server.kill()
        server.wait()


def said(lines, needle, timeout=20) -> str:
    """What the server printed until a line holding `needle` (or the timeout)."""
    text, deadline = "", time.time() + timeout
    while needle not in text and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            text += lines.get(timeout=0.2)
    return text


def fetch(port, path, host=None):
    """A raw GET (the path is sent as is, the Host header as given; host=False sends none)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    if host is not False:
        connection.putheader("Host", host or f"127.0.0.1:{port}")
    connection.endheaders()
    response = connection.getresponse()
    status, body = response.status, response.read().decode(errors="replace")
    connection.close()
    return status, body


def good_run(runs, folder):
    shutil.copytree(runs / "runs" / "repo", folder)
    return folder


def test_broken_runs_are_listed_apart_and_the_others_still_served(browser, runs, tmp_path):
    root = tmp_path / "outputs"
    good_run(runs, root / "good")
    good_run(runs, root / "javascript:window.__pwned=1")  # a folder name the picker must not make a link of
    summary = json.loads((runs / "runs" / "repo" / "summary.json").read_text())
    broken = {"truncated": ('{"schema": "rlm-pipelines/run@1", "root": {"id": "a0", "chil', None),
              "summary-not-json": ("{}", "{ nope"), "cost-abc": ("{}", {**summary, "cost_usd": "abc"}),
              "wall-null": ("{}", {**summary, "wall_time_s": None}), "agents-dict": ("{}", {**summary, "agents": {}}),
              "agents-html": ("{}", {**summary, "agents": PAYLOAD}), "summary-list": ("{}", [1, 2]),
              "huge-number": ("{}", '{"cost_usd": 1' + "0" * 400 + "}"), "deep": ("[" * 100_000, None),
              "not-utf8": (b"\xff\xfe{}", None), "bundle-fails": ("{}", {}), "fifo": (None, None)}
    for name, (tree, summary_json) in broken.items():
        folder = root / "bad" / name
        folder.mkdir(parents=True)
        if tree is None:
            os.mkfifo(folder / "run.json")  # reading it would block the picker for ever
        else:
            (folder / "run.json").write_bytes(tree if isinstance(tree, bytes) else tree.encode())
        if summary_json is not None:
            text = summary_json if isinstance(summary_json, str) else json.dumps(summary_json)
            (folder / "summary.json").write_text(text)
    (root / "bad" / "bundle-fails" / "viewer").write_text("a file where the bundle's folder goes")
    with picker_server(root) as (port, lines):
        started = said(lines, "bad/wall-null")
        assert "serving 2 runs" in started, started
        assert all(f"broken: bad/{name} " in started for name in broken), started
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        assert page.locator("#runs tr").count() == 3  # header + the two good runs
        listed = page.locator("#broken li").all_inner_texts()
        assert sorted(text.split(" ")[1] for text in listed) == sorted(f"bad/{name}" for name in broken)
        assert "cost_usd is \"abc\", not float" in page.locator("#broken").inner_text()
        assert page.eval_on_selector_all("#runs a", "links => links.map(a => a.protocol)") == ["http:", "http:"]
        assert page.evaluate("typeof window.__pwned") == "undefined"
        page.locator("#runs a", has_text="good").click()
        page.wait_for_selector("#tree .node")
        assert page.locator("#tree .node").count() == 1 + 3 + TODOS


def test_the_picker_serves_no_symlink_and_nothing_outside_its_folder(runs, tmp_path):
    root, outside = tmp_path / "outputs", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET")
    good_run(runs, outside / "run")
    (outside / "summary.json").write_text(json.dumps({"task": "TOP SECRET TASK"}))
    run_dir = good_run(runs, root / "runs" / "x")
    (run_dir / "viewer" / "leak").symlink_to(outside / "secret.txt")
    (run_dir / "viewer" / "passwd").symlink_to("/etc/passwd")
    (root / "runs" / "linked").symlink_to(outside / "run")  # a whole run folder pointing outside
    (root / "runs" / "linked-dir").symlink_to(outside)
    linked_summary = good_run(runs, root / "runs" / "y")
    (linked_summary / "summary.json").unlink()
    (linked_summary / "summary.json").symlink_to(outside / "summary.json")
    with picker_server(root) as (port, lines):
        started = said(lines, "serving")
        assert fetch(port, "/runs/x/viewer/app.js")[0] == 200  # a real file is served
        assert fetch(port, "/runs/x/viewer/")[0] == 200  # a folder means its index.html
        for path in ("/runs/x/viewer/leak", "/runs/x/viewer/passwd", "/runs/linked/viewer/index.html",
                     "/runs/linked-dir/secret.txt", "/runs/linked/", "/runs/x/", "/../../etc/passwd",
                     "/%2e%2e/%2e%2e/etc/passwd", "/runs/x/viewer/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     "/runs/y/summary.json"):
            status, body = fetch(port, path)
            assert status == 404, (path, status)
            assert "TOP SECRET" not in body, (path, status)
            assert "root:" not in body, (path, status)
        status, body = fetch(port, "/")
        assert "TOP SECRET" not in body
        assert "broken: runs/y" in body
        assert "runs/linked" not in body
        assert "serving 1 runs" in started  # neither linked folder is a run


def test_the_picker_answers_only_to_loopback_host_names(runs, tmp_path):
    good_run(runs, tmp_path / "outputs" / "run")
    with picker_server(tmp_path / "outputs") as (port, lines):
        assert "serving 1 runs" in said(lines, "serving")
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost", "LOCALHOST"):
            assert fetch(port, "/", host)[0] == 200, host
            assert fetch(port, "/run/viewer/app.js", host)[0] == 200, host
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "localhost:x",
                     f"localhost@evil.example:{port}", "[::1", False):
            for path in ("/", "/run/viewer/data.js", "/run/run.json"):
                status, body = fetch(port, path, host)
                assert status in (403, 421), (host, path)
                assert "repo_todos" not in body, (host, path)
                assert "RLM_DATA" not in body, (host, path)


def fake_browser(tmp_path, body):
    script = tmp_path / "browser.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    # no DISPLAY and an empty PATH: webbrowser finds no other browser to fall back on
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    return str(script), {**env, "PATH": str(empty)}


def test_open_starts_the_browser_with_the_url(runs, tmp_path):
    good_run(runs, tmp_path / "outputs" / "run")
    opened = tmp_path / "opened.txt"
    script, env = fake_browser(tmp_path, f'echo "$1" > {opened}')
    with picker_server(tmp_path / "outputs", "--open", env={**env, "BROWSER": script}) as (port, lines):
        assert "serving 1 runs" in said(lines, "serving")
        deadline = time.time() + 20
        while not (opened.exists() and opened.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        assert opened.read_text().strip() == f"http://127.0.0.1:{port}/"
        assert "could not open" not in said(lines, "could not open", timeout=1)


@pytest.mark.parametrize("browser_command", ["fails", "missing"])
def test_open_says_when_no_browser_opens_and_gives_the_url(runs, tmp_path, browser_command):
    good_run(runs, tmp_path / "outputs" / "run")
    script, env = fake_browser(tmp_path, "exit 3")
    command = script if browser_command == "fails" else str(tmp_path / "no-such-browser")
    with picker_server(tmp_path / "outputs", "--open", env={**env, "BROWSER": command}) as (port, lines):
        text = said(lines, "by hand")
        assert "could not open a browser" in text, text
        assert f"open http://127.0.0.1:{port}/ by hand" in text, text
        assert fetch(port, "/")[0] == 200  # and the server goes on


def hostile_run(run_dir):
    """A run folder whose every string field the viewer shows holds a script or HTML payload (valid JSON)."""
    p = PAYLOAD
    usage = {"prompt_tokens": p, "completion_tokens": p, "tokens": p, "cost_usd": p, "llm_calls": p}

    def agent(suffix, depth, children, iterations):
        return {"id": p + suffix, "parent_id": p, "depth": depth, "kind": "agent", "task": p, "status": p,
                "started_at": "2026-01-01T00:00:00Z", "ended_at": "2026-01-01T00:00:02Z", "duration_s": p,
                "usage": {"own": usage, "total": usage}, "result": p, "result_truncated": p, "error": p,
                "iterations": iterations, "children": children, "refused": {"count": p, "reasons": {p: p}, "kept": p}}

    def iteration(index, children):
        return {"index": index, "prompt": p, "response": p, "reasoning": p, "code": p + "\nprint('x') # " + p,
                "stdout": p, "stderr": p, "error": p, "duration_s": p, "usage": usage, "children": children,
                "origin": p}

    call = {"id": p + "c1", "parent_id": p + "a0", "depth": p, "kind": "llm_call", "task": p, "status": p,
            "result": p, "children": [], "iterations": [], "origin": p}
    child = agent("a1", p, [], [iteration(p, [])])
    root = agent("a0", 0, [child, call], [iteration(p, [p + "a1", p + "c1"]), iteration(1, [p])])
    run = {"schema": p, "id": p, "status": p, "task": p, "model": p, "model_name": p, "engine": p,
           "started_at": p, "ended_at": p, "duration_s": p, "usage": usage, "result": p, "error": p, "root": root,
           "partial": {"note": p, "refused": {p: p}}, "replayed_from": p, "resumed_from": p}
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(run))
    (run_dir / "summary.json").write_text(json.dumps({k: p for k in ("task", "model", "status", "error", "engine",
                                                                        "agents", "cost_usd", "wall_time_s")}))
    marks = ("diff ", "--- ", "+++ ", "@@ ", "+", "-", " ")
    (run_dir / "patch.diff").write_text("\n".join(f"{mark}{p}" for mark in marks))
    (run_dir / "plots").mkdir()
    (run_dir / "plots" / f"{p}.png").write_bytes(PNG)
    write_bundle(run_dir)
    return run_dir


def test_hostile_run_data_never_becomes_markup(browser, tmp_path):
    run_dir = hostile_run(tmp_path / "hostile")
    page, errors = open_page(browser, f"file://{run_dir}/viewer/index.html")
    page.set_default_timeout(5000)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    for selector in ("#tree .node", "#timeline .bar", "#iterations .child-link", "#calls summary", "#patch span",
                     "#stats .stat", "img.plot"):
        for i in range(page.locator(selector).count()):
            page.locator(selector).nth(i).hover()
            page.locator(selector).nth(i).click()
    page.locator("#tree .node").nth(1).click()  # the child agent: its own iterations
    page.fill("#search", "onerror")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    handlers = page.evaluate("""[...document.querySelectorAll('*')].flatMap(e => [...e.attributes]
        .filter(a => a.name.startsWith('on')).map(a => e.tagName + ' ' + a.name))""")
    assert handlers == []
    assert page.locator("svg").count() == 0
    assert page.locator("img").count() == 1
    assert page.eval_on_selector("img.plot", "i => i.naturalWidth") == 1
    assert PAYLOAD in page.locator("#agent h2").first.text_content()  # shown as text, not lost
    assert PAYLOAD in page.locator("#partial").text_content()
    assert PAYLOAD in page.locator("#agent .origin").first.text_content()  # cached / replayed, as text
    assert PAYLOAD in page.locator("#calls .origin").text_content()
    assert page.locator("#stats .stat[title]").get_attribute("title") == PAYLOAD  # the recorded run, as text
    assert page.locator(".badge.unknown").count() == 2  # an unknown status gets no class of its own choosing
    assert errors == []


def test_a_partial_run_says_why(browser, tmp_path):
    """Issue 11, point 18: a run whose sub-agents were refused is `partial`, and the page says why."""
    repo = build(tmp_path / "src")
    summary = run(tmp_path / "run", "task=repo_todos", f"task.repo={repo['path']}", "limits.max_sandboxes=3")
    assert summary["status"] == "partial"
    page, errors = open_page(browser, f"file://{tmp_path / 'run'}/viewer/index.html")
    assert page.locator("#partial").is_visible()
    assert "sub-agents refused (limits.max_sandboxes reached)" in page.locator("#partial").text_content()
    assert "partial" in page.locator("#stats").text_content()
    assert page.locator(".badge.partial").count() == 0  # agents keep their own statuses
    assert "1 sub-agents refused" in page.locator("#agent").text_content()  # the root: one package refused
    assert errors == []
