"""The viewer in a real headless Chromium (Debian's), over file:// bundles of real runs and the run picker."""

import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from rlm_pipelines.orchestration.inprocess import run_steps
from tests.conftest import BOOK, PROJECT, free_port
from tests.fixtures.todo_repo import TODOS, build
from tests.test_config import composed

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (bash scripts/install.sh installs it)", allow_module_level=True)


def run(run_dir, *overrides):
    config = OmegaConf.to_container(composed("model=scripted", "orchestration.prefect=false",
                                             "orchestration.progress=false", *overrides), resolve=True)
    return run_steps(config, str(run_dir))


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
    assert "9" in page.locator("#stats").inner_text() and "ok" in page.locator("#stats").inner_text()
    page.locator("#tree .node[data-id='a1']").click()  # a child: its iterations are shown
    assert page.locator("#agent h2").first.inner_text().lower().startswith("agent a1")
    assert page.locator("#iterations .iteration").count() == 2
    spawned = page.locator("#iterations .child-link")
    assert spawned.count() >= 1  # the children this iteration spawned, from the recorded ids
    first_child = spawned.first.inner_text()
    spawned.first.click()
    assert first_child.lower() in page.locator("#agent h2").first.inner_text().lower()
    assert page.locator("#patch .add").count() >= 1 and page.locator("#patch .del").count() >= 1
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
    assert width and width > 1000


def test_unknown_schema_is_said_plainly(browser, runs, tmp_path):
    shutil.copytree(runs / "runs" / "repo" / "viewer", tmp_path / "viewer")
    data = (tmp_path / "viewer" / "data.js").read_text().replace("rlm-pipelines/run@1", "rlm-pipelines/run@9", 1)
    (tmp_path / "viewer" / "data.js").write_text(data)
    page, errors = open_page(browser, f"file://{tmp_path}/viewer/index.html")
    assert "this viewer knows" in page.locator("#banner").inner_text() and errors == []


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
