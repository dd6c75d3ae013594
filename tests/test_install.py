"""The project installs like any Python package: a wheel built from this checkout, installed into a fresh
virtual environment with no checkout on its path, works from an unrelated folder (`--help`, the offline
Monte Cristo job through Prefect, the run picker), and a user's own config folder adds a model without
touching the installed package."""

import json
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import BOOK, PROJECT, free_port

pytestmark = pytest.mark.slow

# Checkout folders that are parts of the package, and where the wheel puts them (pyproject's package-dir).
PACKAGE_DIRS = {"rlm_pipelines": "rlm_pipelines", "conf": "rlm_pipelines/conf", "viewer": "rlm_pipelines/viewer",
                "tasks": "rlm_tasks"}
NOT_OURS = ("__editable__", "rlm_pipelines", "rlm_tasks", "rlm_example_task")


def source_files() -> list[str]:
    """The package's files in the checkout, as git knows them (a clean clone in CI) or on disk."""
    try:
        listed = subprocess.run(["git", "ls-files", *PACKAGE_DIRS], cwd=PROJECT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(PROJECT)) for d in PACKAGE_DIRS for p in (PROJECT / d).rglob("*") if p.is_file()]
    return [f for f in listed if "__pycache__" not in f and (PROJECT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # built from a copy, so the build leaves nothing in the checkout
    shutil.copytree(PROJECT, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", "*.egg-info",
                                                                "build", "dist", ".bench", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(work / "dist"), str(src)], check=True, capture_output=True)
    return next((work / "dist").glob("rlm_pipelines-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the dependencies come from the test environment's
    site-packages (linked, without this project's own entries), so nothing of the checkout is reachable."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    python = root / "env" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(NOT_OURS):
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "test-dependencies.pth").write_text(f"{deps}\n")
    return root / "env"


def run(venv: Path, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "LANG": "C.UTF-8", **(env or {})}
    return subprocess.run([str(venv / "bin" / "python"), *args], cwd=cwd, env=clean, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for path in source_files():
        top, rest = path.split("/", 1)
        expected.add(f"{PACKAGE_DIRS[top]}/{rest}")
    assert expected - names == set()
    assert any(n.startswith("rlm_pipelines/conf/engine/") for n in names)


def test_the_installed_package_is_not_the_checkout(venv, tmp_path):
    done = run(venv, ["-c", "import rlm_pipelines, rlm_tasks; print(rlm_pipelines.__file__, rlm_tasks.__file__)"],
               tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(PROJECT) not in done.stdout
    assert done.stdout.startswith(str(venv))


def test_help_from_another_folder_lists_every_group(venv, tmp_path):
    done = run(venv, ["-m", "rlm_pipelines", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    models = sorted(p.stem for p in (PROJECT / "conf" / "model").glob("*.yaml"))
    for line in ("engine: document, repo", f"model: {', '.join(models)}",
                 "task: doc_qa, monte_cristo, needles, repo_audit, repo_todos"):
        assert line in done.stdout


def test_the_console_script_is_installed(venv, tmp_path):
    done = subprocess.run([str(venv / "bin" / "rlm-pipelines"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "sandbox: daytona, local" in done.stdout


def test_the_offline_job_and_the_run_picker_work_from_the_wheel(venv, prefect_server, tmp_path):
    done = run(venv, ["-m", "rlm_pipelines", "task=monte_cristo", "model=scripted", f"task.source={BOOK}"], tmp_path,
               prefect_server["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "runs" / "monte_cristo").glob("*/*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["iterations"] == 4
    assert (run_dir / "plots" / "wealth_trajectories.png").stat().st_size > 10_000
    assert "window.RLM_DATA" in (run_dir / "viewer" / "data.js").read_text()

    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "python"), "-m", "rlm_pipelines.viewer", "outputs", "--port",
                               str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "serving 1 runs" in server.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            picker = response.read().decode()
        relative = run_dir.relative_to(tmp_path / "outputs")
        assert f"{relative}/viewer/index.html" in picker
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{relative}/viewer/app.js", timeout=10) as response:
            assert response.status == 200
    finally:
        server.terminate()
        server.wait(10)


def test_a_users_config_folder_adds_a_model(venv, tmp_path):
    mine = tmp_path / "my_conf" / "model"
    mine.mkdir(parents=True)
    (mine / "offline_twin.yaml").write_text("name: offline_twin\nmodel: scripted/${task.name}\n"
                                            "sub:\n  model: scripted/${task.name}.sub\nnum_retries: 0\n")
    helped = run(venv, ["-m", "rlm_pipelines", "--config-dir", "my_conf", "--help"], tmp_path)
    assert "offline_twin" in helped.stdout
    done = run(venv, ["-m", "rlm_pipelines", "--config-dir", "my_conf", "model=offline_twin", f"task.source={BOOK}",
                      "orchestration.prefect=false"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "outputs" / "runs" / "monte_cristo").glob("*/*_offline_twin/summary.json"))
