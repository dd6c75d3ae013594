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


def cli(args, cwd, env=None, timeout=600):
    """Run `python -m rlm_pipelines ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
