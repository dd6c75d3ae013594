"""A credential in task.repo (issue 11, point 7): a private repo behind real git smart HTTP with Basic auth
is cloned, and the token reaches no record, no cache, no sandbox and no console. The real CLI, a real
bubblewrap sandbox whose cell code hunts for the token, a local OpenAI-compatible server as the model."""

import base64
import json
import os
import subprocess
import sys

import pytest

from rlm_pipelines.engines.checkout import CheckoutError, prepare_mirror
from tests.conftest import api, daytona_overrides, run_dir_of
from tests.fakes.git_http_server import GitHttpServer
from tests.fakes.openai_server import OpenAIServer
from tests.fixtures.todo_repo import build

USER, TOKEN = "ci-bot", "s3cr3t-TOKEN-5a7b9c1d"

# The cell never names the token (the model does not know it): it is handed its pieces and looks for them
# joined everywhere the sandbox can see: the mirror, the checkout's remotes, its environment, its files.
HUNT = ("import os, json, subprocess\n"
        "token = {parts!r}[0] + {parts!r}[1]\n"
        "found = []\n"
        "for top in ('/mirror', '/workspace', '/tmp', '/etc'):\n"
        "    for base, dirs, files in os.walk(top):\n"
        "        for name in files:\n"
        "            path = os.path.join(base, name)\n"
        "            try:\n"
        "                if token.encode() in open(path, 'rb').read():\n"
        "                    found.append(path)\n"
        "            except OSError:\n"
        "                pass\n"
        "remotes = subprocess.run(['git', 'remote', '-v'], cwd='/workspace/repo', capture_output=True,\n"
        "                         text=True).stdout\n"
        "mirror_url = subprocess.run(['git', '-C', '/mirror', 'config', 'remote.origin.url'], capture_output=True,\n"
        "                            text=True).stdout\n"
        "print('REMOTES', remotes, 'MIRROR', mirror_url)\n"
        "FINAL({{'files': found, 'env': token in json.dumps(dict(os.environ)),\n"
        "       'remotes': token in remotes + mirror_url,\n"
        "        'mirror_url': mirror_url.strip(), 'head': open('/workspace/repo/alpha/core.py').read()[:40]}})\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("git-http")
    repo = build(base / "src")
    (base / "root").mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(repo["path"]), str(base / "root" / "repo.git")], check=True)
    with GitHttpServer(base / "root", USER, TOKEN) as server:
        yield repo, server


def forms(secret: str) -> list[bytes]:
    """The ways a token could be written down: as is, and inside a Basic auth header."""
    return [secret.encode(), base64.b64encode(f"{USER}:{secret}".encode())]


def files_holding(folder, secret):
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(form in data for form in forms(secret)):
                hits.append(str(path))
    return hits


@pytest.mark.parametrize("mode", ["in-process", "prefect", "sweep", "daytona"])
def test_a_token_in_task_repo_clones_and_is_kept_out_of_everything(served, tmp_path, request, mode):
    repo, server = served
    cell = HUNT.format(parts=[TOKEN[:9], TOKEN[9:]])
    cache = tmp_path / "cache"
    env = {**os.environ, "RLM_TEST_KEY": "k", "RLM_CACHE_DIR": str(cache)}
    extra = [f"orchestration.prefect={str(mode == 'prefect').lower()}"]
    if mode == "prefect":
        env.update(request.getfixturevalue("prefect_server")["env"])
    if mode == "daytona":  # a cloud sandbox cannot see the mirror: it gets it uploaded, never the URL
        fake = request.getfixturevalue("fake_daytona")
        calls = len(fake.calls)
        extra += daytona_overrides(fake)
        env = {**os.environ, **env}  # the fake's API key variable, set by its fixture
    url = f"http://{USER}:{TOKEN}@127.0.0.1:{server.port}/repo.git"
    with OpenAIServer(reply=lambda request: f"```python\n{cell}```") as model:
        done = subprocess.run([sys.executable, "-m", "rlm_pipelines", *(["-m"] if mode == "sweep" else []),
                               "task=repo_todos", f"task.repo={url}", "model=local", f"model.api_base={model.url}",
                               "model.api_key_env=RLM_TEST_KEY", *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(r["authorized"] for r in server.requests)  # the host's fetch sent the credential
    sweeps = tmp_path / "outputs" / "sweeps"
    run_dir = next(sweeps.rglob("run.json")).parent if mode == "sweep" else run_dir_of(tmp_path)
    tree = json.loads((run_dir / "run.json").read_text())
    assert tree["commit"] == repo["head"]  # the clone worked
    found = json.loads((run_dir / "result.json").read_text())
    assert found["files"] == [] and found["env"] is False and found["remotes"] is False, found
    assert "def add" in found["head"]
    assert tree["repo"] == f"http://127.0.0.1:{server.port}/repo.git" == tree["config"]["task"]["repo"]
    if mode == "daytona":
        assert not any("git/clone" in path for _, path in fake.calls[calls:])
        assert any("bulk-upload" in path for _, path in fake.calls[calls:])
    else:
        assert found["mirror_url"] == tree["repo"]  # the mirror's config holds the clean URL
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    for secret in (TOKEN,):
        assert files_holding(run_dir, secret) == []  # run.json, data.js, summary, logs, .hydra/*.yaml
        assert files_holding(tmp_path / "outputs", secret) == []  # a sweep's multirun.yaml and report too
        assert files_holding(cache, secret) == []  # the mirror cache
        assert secret not in done.stdout + done.stderr  # the console
    assert "***" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    if mode == "prefect":  # the flow run's parameters, task runs, logs and artifacts in Prefect's database
        url = request.getfixturevalue("prefect_server")["url"]
        stored = json.dumps([api(url, f"/{kind}/filter") for kind in ("flow_runs", "task_runs", "logs", "artifacts")])
        assert f"127.0.0.1:{server.port}/repo.git" in stored
        assert not any(form.decode() in stored for form in forms(TOKEN))


def test_a_repo_that_looks_like_an_option_is_given_to_git_as_a_url(tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "ran"
    with pytest.raises(CheckoutError) as error:
        prepare_mirror(f"--upload-pack=touch {marker};true", None, None)
    assert f"repository '--upload-pack=touch {marker};true' does not exist" in str(error.value)
    assert not marker.exists()
