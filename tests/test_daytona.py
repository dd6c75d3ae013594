"""sandbox=daytona: DaytonaSandbox through the real SDK against the local fake Daytona API
(tests/fakes/daytona_server.py), both engines end to end, and one live test for a real account."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from rlm_pipelines.sandbox import make_sandbox
from rlm_pipelines.sandbox.daytona import DaytonaSandbox
from tests.conftest import (BOOK, FAKE_KEY_ENV, PROJECT, agents, check_monte_cristo_outputs, cli, daytona_config,
                            daytona_overrides, run_dir_of, run_scripted)
from tests.fixtures.todo_repo import TODOS, build

LIVE_KEY = os.environ.get("DAYTONA_API_KEY")  # read before any fixture touches the environment


@pytest.fixture
def fake(fake_daytona):
    yield fake_daytona
    fake_daytona.preview_faults.clear()
    fake_daytona.clone_error = None
    fake_daytona.network_locked = False
    assert fake_daytona.sandboxes == {}, "a test left Daytona sandboxes behind"


def test_sandboxes_are_labelled_offline_ephemeral_and_deleted(fake):
    config = daytona_config(fake)
    config.labels = {"rlm-run": "r1", "rlm-task": "t"}
    with make_sandbox(config, name="agent-a0") as sandbox:
        created = fake.sandboxes[sandbox.id].request
        assert created["labels"] == {"rlm-pipelines": "1", "rlm-run": "r1", "rlm-task": "t",
                                     "rlm-agent": "agent-a0", "code-toolbox-language": "python"}
        assert created["networkBlockAll"] is True
        assert created["autoDeleteInterval"] == 0  # ephemeral
        assert created["ttlMinutes"] == 240
        assert created["autoStopInterval"] == 15
        assert created["public"] is False
    assert fake.deleted[-1].id == sandbox.id


def test_the_preview_url_needs_both_the_token_and_the_session_secret(fake):
    with make_sandbox(daytona_config(fake), name="auth") as sandbox:
        session = sandbox.open_repl()
        transport = session._conn.transport
        url = transport.url + "/events?after=0&wait=0"
        token = {"X-Daytona-Preview-Token": fake.sandboxes[sandbox.id].token}
        assert httpx.get(url).status_code == 401  # the gateway: no preview token
        assert httpx.get(url, headers=token).status_code == 403  # our server: no session secret
        assert httpx.get(url, headers={**token, "X-Rlm-Secret": "guess"}).status_code == 403
        assert session.execute("6 * 7").value == "42"


def test_gateway_errors_are_retried_and_a_cell_never_runs_twice(fake):
    with make_sandbox(daytona_config(fake), name="flaky") as sandbox:
        session = sandbox.open_repl()
        assert session.execute("runs = 0").ok
        for faults in (["after"], ["before"], ["reset"], ["after", "reset", "before"]):
            fake.preview_faults[:] = faults  # the next requests: lost on the way in, or their answer lost
            result = session.execute("runs += 1\nruns")
            assert result.ok, result.output()
        assert session.execute("runs").value == "4"  # one run per cell although requests were replayed
        assert not fake.preview_faults  # all five faults were served, and every cell above still succeeded


def test_clone_blocks_the_network_again_and_checks_out_the_commit(fake, tmp_path):
    repo = build(tmp_path / "repo")
    with make_sandbox(daytona_config(fake), name="clone") as sandbox:
        sandbox.clone(repo["path"].as_uri(), "/workspace/repo", commit=repo["head"])
        assert sandbox.run("git rev-parse HEAD", cwd="repo")[1].strip() == repo["head"]
        history = fake.sandboxes[sandbox.id].network_history
        assert history == [{"networkBlockAll": False}, {"networkBlockAll": True}]
        assert fake.sandboxes[sandbox.id].network_block_all


def test_a_locked_network_falls_back_to_uploading_the_repo(fake, tmp_path):
    from rlm_pipelines.engines.checkout import make_bundle, prepare_mirror
    from rlm_pipelines.sandbox import SandboxConfigError

    repo = build(tmp_path / "repo")
    mirror, commit = prepare_mirror(str(repo["path"]), None, None)
    bundle = make_bundle(mirror, str(tmp_path))
    fake.network_locked = True  # Daytona tiers 1-2: no runtime network changes
    with make_sandbox(daytona_config(fake, checkout="clone"), name="locked") as sandbox:
        with pytest.raises(SandboxConfigError, match="checkout=upload"):
            sandbox.clone("https://example.invalid/repo.git", "/workspace/repo", commit=commit, bundle=lambda: bundle)
    with make_sandbox(daytona_config(fake), name="locked") as sandbox:  # checkout: auto
        sandbox.clone("https://example.invalid/repo.git", "/workspace/repo", commit=commit, bundle=lambda: bundle)
        assert sandbox.run("git rev-parse HEAD && git status --porcelain", cwd="repo") == (0, commit + "\n")
        assert fake.sandboxes[sandbox.id].network_block_all  # never opened
        assert sandbox.run("ls /tmp/.rlm")[1].strip() == ""  # the bundle is gone once checked out


def test_monte_cristo_end_to_end_in_daytona_sandboxes(fake, prefect_server, tmp_path):
    before = len(fake.uploads)
    done = cli(["task=monte_cristo", "model=scripted", f"task.source={BOOK}", *daytona_overrides(fake)],
               tmp_path, prefect_server["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    run = check_monte_cristo_outputs(run_dir_of(tmp_path))
    assert run["usage"]["sandboxes"] == 1
    assert run["sandbox"]["kind"] == "daytona"
    sandbox_id = run["root"]["sandbox_id"]
    mine = [u for u in fake.uploads[before:] if u[0] == sandbox_id]
    inputs = [u for u in mine if ".rlm-inputs" in u[1]]
    assert len(inputs) == 1
    assert inputs[0][2] > 2_000_000  # the book went up once, as a file
    created = [s for s in fake.deleted if s.id == sandbox_id][0]
    assert created.labels["rlm-run"] == run["id"]
    assert created.labels["rlm-task"] == "monte_cristo"


def test_a_depth_two_repo_run_in_daytona_sandboxes(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "cache"))
    repo = build(tmp_path / "repo")
    first = len(fake.deleted)
    run_dir = tmp_path / "run"
    summary, tree = run_scripted(run_dir, "task=repo_todos", f"task.repo={repo['path']}", *daytona_overrides(fake),
                                 "sandbox.daytona.checkout=clone")
    assert summary["status"] == "ok", tree["error"]
    assert len(agents(tree["root"], 1)) == 3
    assert len(agents(tree["root"], 2)) == TODOS
    assert tree["usage"]["sandboxes"] == 1 + 3 + TODOS
    assert b"+    # DONE: validate inputs" in (run_dir / "patch.diff").read_bytes()
    made = fake.deleted[first:]
    assert len(made) == 1 + 3 + TODOS  # one fresh sandbox per agent, every one deleted
    assert all(s.network_block_all and s.labels["rlm-run"] == tree["id"] for s in made)


def test_sub_agents_can_be_forks_of_one_prepared_sandbox(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "cache"))
    repo = build(tmp_path / "repo")
    first, uploads = len(fake.forks), len(fake.uploads)
    run_dir = tmp_path / "run"
    summary, tree = run_scripted(run_dir, "task=repo_todos", f"task.repo={repo['path']}", *daytona_overrides(fake),
                                 "sandbox.fork_subagents=true")  # a local path: checkout=auto uploads it
    assert summary["status"] == "ok", tree["error"]
    assert len(agents(tree["root"], 2)) == TODOS
    assert len(fake.forks) - first == 3 + TODOS  # every sub-agent: a fork of the template
    bundles = [u for u in fake.uploads[uploads:] if u[1].endswith("repo.bundle")]
    assert len(bundles) == 2  # the root's checkout and the template's, nothing per sub-agent
    assert tree["usage"]["sandboxes"] == 1 + 1 + 3 + TODOS
    assert b"+    # DONE: validate inputs" in (run_dir / "patch.diff").read_bytes()


def test_a_failed_clone_fails_the_run_clearly_and_leaves_no_sandbox(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_CACHE_DIR", str(tmp_path / "cache"))
    repo = build(tmp_path / "repo")
    fake.clone_error = "authentication required for the repository"
    summary, tree = run_scripted(tmp_path / "run", "task=repo_todos", f"task.repo={repo['path']}",
                                 *daytona_overrides(fake),
                           "sandbox.daytona.checkout=clone", "orchestration.retries=0")
    assert summary["status"] == "error"
    assert "could not clone" in tree["error"]
    assert "authentication required" in tree["error"]
    # the `fake` fixture then checks that the sandbox made for the root agent was deleted


def test_a_missing_api_key_fails_before_anything_starts(fake, tmp_path):
    created = fake.calls.count(("POST", "/api/sandbox"))
    done = cli(["task=monte_cristo", "model=scripted", f"task.source={BOOK}", "orchestration.prefect=false",
                *daytona_overrides(fake), "sandbox.daytona.api_key_env=RLM_NO_SUCH_KEY"], tmp_path)
    assert done.returncode == 2
    assert "RLM_NO_SUCH_KEY" in done.stderr
    assert "Traceback" not in done.stderr
    assert fake.calls.count(("POST", "/api/sandbox")) == created


def test_cleanup_deletes_orphans_by_label_only(fake, tmp_path):
    from daytona import CreateSandboxFromSnapshotParams

    orphan = DaytonaSandbox(daytona_config(fake), name="orphan")
    orphan.config.labels = {"rlm-run": "dead-run", "rlm-task": "t"}
    orphan.start()
    from rlm_pipelines.sandbox.daytona import client
    stranger = client(orphan.options).create(CreateSandboxFromSnapshotParams(labels={"team": "other"}))
    settings = tmp_path / "daytona.yaml"
    settings.write_text(f"kind: daytona\ndaytona:\n  api_url: {fake.api_url}\n  api_key_env: {FAKE_KEY_ENV}\n")
    command = [sys.executable, "-m", "rlm_pipelines.sandbox", "cleanup", "--config", str(settings)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    listed = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0
    assert f"would delete {orphan.id}" in listed.stdout
    assert orphan.id in fake.sandboxes
    done = subprocess.run(command + ["--run", "dead-run"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"deleted {orphan.id}" in done.stdout, done.stderr
    assert orphan.id not in fake.sandboxes
    assert stranger.id in fake.sandboxes  # not ours: left alone
    stranger.delete()
    orphan.stop()  # already gone: stopping again is quiet


@pytest.mark.daytona
@pytest.mark.skipif(not LIVE_KEY, reason="needs DAYTONA_API_KEY (a real Daytona account)")
def test_live_daytona_sandbox_runs_a_repl_and_is_deleted():
    from rlm_pipelines.config import DaytonaSandboxConfig
    from rlm_pipelines.sandbox.daytona import client

    config = DaytonaSandboxConfig()
    config.labels = {"rlm-run": "live-test"}
    with make_sandbox(config, name="live") as sandbox:
        assert sandbox.run("python3 -c 'print(6*7)'") == (0, "42\n")
        session = sandbox.open_repl()
        session.register({"double": lambda x: 2 * x}, submit_fields=["answer"])
        result = session.execute("SUBMIT(answer=double(21))")
        assert result.final == {"kind": "submit", "value": {"answer": 42}}
        sandbox_id = sandbox.id
    from daytona import ListSandboxesQuery

    # Deletion is asynchronous on Daytona's side: gone, or on its way out.
    left = [(s.id, str(getattr(s, "state", "")).lower().rsplit(".", 1)[-1])
            for s in client(config.daytona).list(ListSandboxesQuery(labels={"rlm-run": "live-test"}))]
    assert not [(i, state) for i, state in left if i == sandbox_id and state not in ("destroyed", "destroying")], left


def test_ctrl_c_deletes_the_run_s_daytona_sandboxes(fake, plugin_path, tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": plugin_path}
    posts = fake.calls.count(("POST", "/preview/{id}/{port}/..."))
    process = subprocess.Popen([sys.executable, "-m", "rlm_pipelines", "task=slow_echo", "model=scripted",
                                "task.sleep_s=120", "orchestration.prefect=false", *daytona_overrides(fake)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while fake.calls.count(("POST", "/preview/{id}/{port}/...")) == posts and time.time() < deadline \
            and process.poll() is None:
        time.sleep(0.2)
    assert fake.sandboxes, f"the run never started its sandbox: {process.poll()} {process.stderr.read()[-3000:]}"
    time.sleep(2)  # the slow cell is running
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr[-3000:]
    assert json.loads((run_dir_of(tmp_path) / "run.json").read_text())["status"] == "cancelled"
    assert fake.sandboxes == {}
