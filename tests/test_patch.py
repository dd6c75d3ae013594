"""The root agent's patch against hostile cell code (issue 11, point 3): a background process that swaps a
FIFO in for the patch file, FIFOs in the checkout, a patch of 100 MB and more. Real CLI runs, real bubblewrap
sandboxes, a real local OpenAI-compatible server playing the model."""

import json
import os
import subprocess
import sys

import pytest

from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.sandbox import DownloadTooLarge, SandboxError, make_sandbox
from rlm_pipelines.sandbox.local import LocalSandbox
from tests.conftest import daytona_config, run_dir_of
from tests.fakes.cli_peak import CLI_WITH_PEAK
from tests.fakes.openai_server import OpenAIServer
from tests.fixtures.todo_repo import build


# Swaps a FIFO in for the patch file as soon as it appears as a plain file (made inside the sandbox by
# `git diff > ...`): a reader that opens it blocking waits forever.
SWAPPER = ("import os, stat, time\n"
           "while True:\n"
           "    try:\n"
           "        if stat.S_ISREG(os.lstat('/tmp/rlm.patch').st_mode):\n"
           "            os.unlink('/tmp/rlm.patch'); os.mkfifo('/tmp/rlm.patch')\n"
           "    except OSError:\n"
           "        pass\n"
           "    time.sleep(0.001)\n")
SWAP_FIFO = (f"import subprocess\nsubprocess.Popen(['python3', '-c', {SWAPPER!r}], start_new_session=True)\n"
             "import os\nos.mkfifo('/workspace/repo/alpha/pipe')\n"
             "open('/workspace/repo/alpha/core.py', 'a').write('# changed\\n')\n")
BIG_PATCH = ("import os\n"
             "with open('/workspace/repo/big.bin', 'wb') as f:\n"
             "    for _ in range(110):\n        f.write(os.urandom(1 << 20))\n"
             "open('/workspace/repo/alpha/core.py', 'a').write('# changed\\n')\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("repo"))


def cli_run(tmp_path, repo, cell, *overrides):
    """A repo run through the CLI whose root agent runs `cell` then answers: (exit code, stderr, run.json,
    run folder, the CLI's peak RSS in MB)."""
    def reply(request):
        return f"```python\n{cell}FINAL('done')\n```"

    env = {**os.environ, "RLM_TEST_KEY": "k", "RLM_CACHE_DIR": str(tmp_path / "cache")}
    with OpenAIServer(reply=reply) as server:
        done = subprocess.run([sys.executable, "-c", CLI_WITH_PEAK, "task=repo_todos", f"task.repo={repo['path']}",
                               "model=local", f"model.api_base={server.url}", "model.api_key_env=RLM_TEST_KEY",
                               "orchestration.prefect=false", *overrides],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    peak = [int(line.split("=")[1]) >> 10 for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
    run_dir = run_dir_of(tmp_path)
    return done.returncode, done.stderr, json.loads((run_dir / "run.json").read_text()), run_dir, peak[-1]


def test_a_fifo_swapped_in_for_the_patch_cannot_hang_the_run(repo, tmp_path):
    code, stderr, tree, run_dir, _ = cli_run(tmp_path, repo, SWAP_FIFO, "limits.wall_time_s=120")
    assert code == 0, stderr[-3000:]
    assert tree["status"] == "ok"
    patch = (run_dir / "patch.diff").read_text()
    assert "+# changed" in patch
    assert "pipe" not in patch  # FIFOs in the checkout are not files: git leaves them out


def test_a_patch_over_max_patch_mb_is_dropped_and_the_cli_stays_small(repo, tmp_path):
    code, stderr, tree, run_dir, peak_mb = cli_run(tmp_path, repo, BIG_PATCH, "sandbox.file_size_mb=200")
    print(f"CLI peak RSS with a 100 MB+ patch: {peak_mb} MB")
    assert code == 0, stderr[-3000:]
    assert tree["status"] == "ok"
    assert "limits.max_patch_mb=20" in tree["patch"]["dropped"]
    assert "limits.max_patch_mb=20" in tree["root"]["patch_note"]
    assert "limits.max_patch_mb=20" in stderr
    assert not (run_dir / "patch.diff").exists() and not (run_dir / "patch.rejected.diff").exists()
    assert sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) < 20 << 20
    assert peak_mb < 600


def test_the_same_patch_is_kept_when_the_limit_allows_it(repo, tmp_path):
    code, stderr, tree, run_dir, _ = cli_run(tmp_path, repo, "open('/workspace/repo/NEW.md', 'w').write('x')\n",
                                             "limits.max_patch_mb=1")
    assert code == 0, stderr[-3000:]
    assert "dropped" not in tree["patch"]
    assert tree["patch"]["applies"] is True
    assert "+x" in (run_dir / "patch.diff").read_text()


@pytest.fixture
def box():
    sandbox = LocalSandbox(LocalSandboxConfig(isolation="bwrap"))
    sandbox.start()
    yield sandbox
    sandbox.stop()


def test_download_takes_regular_files_only_and_caps_their_size(box):
    box.run("mkfifo /tmp/fifo && mkfifo fifo && head -c 3000000 /dev/zero > big && ln -s /dev/zero zero")
    for path in ("/tmp/fifo", "fifo", "zero"):  # a FIFO would block a plain open() forever
        with pytest.raises(SandboxError):
            box.download(path)
    with pytest.raises(DownloadTooLarge):
        box.download("big", max_bytes=1 << 20)
    assert len(box.download("big", max_bytes=3_000_000)) == 3_000_000
    with pytest.raises(TimeoutError):
        box.download("big", deadline=0)


def test_daytona_download_refuses_fifos_and_oversize_files(fake_daytona):
    with make_sandbox(daytona_config(fake_daytona), name="download") as box:
        box.run("mkfifo fifo && head -c 3000000 /dev/zero > big")
        with pytest.raises(SandboxError):
            box.download("fifo")  # asked for its type first: never fetched, so never blocks
        with pytest.raises(DownloadTooLarge):
            box.download("big", max_bytes=1 << 20)
        assert len(box.download("big", max_bytes=3_000_000)) == 3_000_000
