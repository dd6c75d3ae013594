"""Fixtures and helpers every test module shares: real servers (Prefect, a fake Daytona API), the CLI as a
user runs it, and one way to compose and run a scripted config in-process."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Never let litellm or dspy reach for the network (price map) during tests.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

PROJECT = Path(__file__).resolve().parent.parent
BOOK = PROJECT.parent / "shared" / "data" / "monte_cristo" / "1184-0.txt"


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Each test its own cache dir: model calls at temperature 0 are cached there (issue 13), and tests that
    send the same prompt to fake servers answering differently must not get each other's answers."""
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "rlm-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real `prefect server start` on loopback for the whole session (SQLite in a temp PREFECT_HOME).
    Starting it takes 10-30 s on 2 cores; every CLI run in the tests then talks to it, as a user's would."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"url": url, "home": str(home), "env": {"PREFECT_API_URL": url, "PREFECT_HOME": str(home)}}
    os.killpg(server.pid, 9)
    server.wait()
    log.close()


# --------------------------------------------------------------------------- configs and in-process runs


def composed(*overrides):
    """The run config `python -m rlm_pipelines OVERRIDES` would compose (built-in tasks registered)."""
    from hydra import compose, initialize_config_dir

    _register()
    with initialize_config_dir(config_dir=str(_conf()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def scripted_config(*overrides) -> dict:
    """A composed config as plain data, offline: the scripted model, steps in-process, no console."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(composed("model=scripted", "orchestration.prefect=false",
                                           "orchestration.progress=false", *overrides), resolve=True)


def run_scripted(run_dir: Path, *overrides):
    """Run a scripted config in-process into `run_dir`: (summary, run.json). A run that raises is recorded
    all the same; its summary is then {"status": "error", "raised": the exception}."""
    from rlm_pipelines.orchestration.inprocess import run_steps

    try:
        summary = run_steps(scripted_config(*overrides), str(run_dir))
    except Exception as exc:
        summary = {"status": "error", "raised": exc}
    return summary, json.loads((Path(run_dir) / "run.json").read_text())


_registered = []


def _conf() -> Path:
    from rlm_pipelines.paths import conf_dir

    return conf_dir()


def _register() -> None:
    if not _registered:
        from rlm_pipelines.config import register_configs
        from rlm_pipelines.tasks import discover, register_task_schemas

        register_configs()
        register_task_schemas(discover(), _conf())
        _registered.append(True)


def agents(node, depth=None):
    """The agent nodes of a run tree (at `depth`, or all)."""
    found = [node] if node["kind"] == "agent" and (depth is None or node["depth"] == depth) else []
    for child in node["children"]:
        found += agents(child, depth)
    return found


# --------------------------------------------------------------------------- the CLI, as a user runs it


def cli(args, cwd, env=None, timeout=600):
    """Run `python -m rlm_pipelines ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_dir_of(cwd: Path) -> Path:
    """The one run folder a CLI run made under `cwd/outputs`."""
    found = sorted((cwd / "outputs" / "runs").glob("*/*/*"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory):
    """The example plugin package, really installed (into a target dir, for PYTHONPATH)."""
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(PROJECT / "tests" / "plugin_example")], check=True)
    return str(site)


def repl_server_processes(under=None):
    """Host pids of REPL servers running in local sandboxes, by their command line: those below the process
    `under` (a CLI a test started, or the test process itself), else every one on the machine."""
    found = []
    for pid in (descendants(under) if under is not None else [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]):
        try:
            if b"/.rlm/server.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def still_running(pids):
    """Those of `pids` that still run. A zombie has ended: when a sandbox's init dies first, its processes are
    reparented to the host's init, which reaps them a moment later."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def descendants(pid):
    """Pids of every process below `pid` (its children, theirs, ...): what a test watches instead of every
    process on the machine, so runs of other tests in parallel do not confuse it."""
    children = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def api(url, path, body=None):
    """POST to a Prefect server's API."""
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body or {}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def api_get(url, path):
    """GET from a Prefect server's API."""
    with urllib.request.urlopen(f"{url}{path}", timeout=30) as response:
        return json.loads(response.read())


def check_monte_cristo_outputs(run_dir: Path):
    """What a user checks after the offline Monte Cristo job: the tree, the 117 chapters, the fan-out, the
    rows for all five characters, a plot with five drawn lines, the summary."""
    import jsonschema
    import numpy as np
    from PIL import Image

    from rlm_pipelines.tree import SCHEMA_FILE
    from rlm_tasks.monte_cristo.plot import COLOURS

    names = ["Dantès", "Danglars", "Fernand", "Villefort", "Mercédès"]
    run = json.loads((run_dir / "run.json").read_text())
    jsonschema.validate(run, json.loads(SCHEMA_FILE.read_text()))
    assert run["status"] == "ok"
    assert run["usage"]["sandboxes"] == 1
    first = run["root"]["iterations"][0]
    assert first["stdout"].startswith("117 chapters,")  # every chapter reached the sandbox
    fan_out = run["root"]["iterations"][1]
    assert len(fan_out["children"]) == 39
    assert "39 calls" in fan_out["stdout"]
    rows = json.loads((run_dir / "result.json").read_text())["wealth_data"]
    assert {r["character"] for r in rows} == set(names)
    chapters = {r["chapter"] for r in rows}
    assert {1, 117} <= chapters
    assert len(chapters) > 100
    series = json.loads((run_dir / "plots" / "wealth_trajectories.json").read_text())
    assert all(len(series[name]["smoothed"]) > 50 for name in names)
    image = Image.open(run_dir / "plots" / "wealth_trajectories.png").convert("RGB")
    assert image.size[0] >= 1000
    pixels = np.asarray(image).astype(int)
    for colour in COLOURS[:5]:  # each of the five lines is really drawn
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=2) < 12).sum() > 400, colour
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["llm_calls"] == 43
    assert summary["iterations"] == 4
    return run


# --------------------------------------------------------------------------- Daytona

# The live Daytona test looks at the user's real key; the fake uses a variable of its own so they never mix.
FAKE_KEY_ENV = "RLM_FAKE_DAYTONA_KEY"


@pytest.fixture(scope="session")
def fake_daytona():
    """A local Daytona API (tests/fakes/daytona_server.py) for the real SDK; its sandboxes are LocalSandboxes."""
    from tests.fakes.daytona_server import FakeDaytona

    with FakeDaytona() as fake:
        os.environ[FAKE_KEY_ENV] = fake.api_key
        yield fake
    os.environ.pop(FAKE_KEY_ENV, None)


def daytona_config(fake, **options):
    """A DaytonaSandboxConfig for DaytonaSandbox against the fake."""
    from rlm_pipelines.config import DaytonaOptions, DaytonaSandboxConfig, ReplConfig

    repl = options.pop("repl", None) or ReplConfig(start_timeout_s=60)
    return DaytonaSandboxConfig(repl=repl, daytona=DaytonaOptions(
        api_url=fake.api_url, api_key_env=FAKE_KEY_ENV, gateway_retry_s=20, **options))


def daytona_overrides(fake):
    """CLI overrides that point `sandbox=daytona` at the fake (plus the env var holding its key)."""
    return ["sandbox=daytona", f"sandbox.daytona.api_url={fake.api_url}",
            f"sandbox.daytona.api_key_env={FAKE_KEY_ENV}"]
