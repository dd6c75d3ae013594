"""Every way a run ends leaves its records (issue 11, points 8, 9, 10): unique run folders, a folder that holds
a run refused, a lone surrogate from a model, SIGTERM, a full disk, SIGKILL and the clean-up after it; and
the small ones: a document run's root result, the final console line."""

import errno
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlm_pipelines.models import scripted
from rlm_pipelines.models.scripted import register_script
from rlm_tasks.needles import task as needles
from tests.conftest import cli, descendants, run_dir_of, still_running
from tests.fakes.openai_server import OpenAIServer

OFFLINE = ["task=needles", "model=scripted", "orchestration.prefect=false"]
SLEEPING_CELL = ("[[ ## reasoning ## ]]\nWait.\n\n[[ ## code ## ]]\n```python\nimport time\ntime.sleep(300)\n```\n\n"
                 "[[ ## completed ## ]]")


def local_model(server):
    return ["task=needles", "model=local", f"model.api_base={server.url}", "model.model=openai/nd-root",
            "model.sub.model=openai/nd-sub", "orchestration.prefect=false"]


def needles_reply(request, root_text=lambda text: text):
    """The needles script over HTTP; `root_text` may change the root model's replies."""
    register_script("nd-http", needles.script(needles.params()))
    if request["model"] == "nd-sub":
        return scripted.reply("scripted/nd-http.sub", request["messages"])
    return root_text(scripted.reply("scripted/nd-http", request["messages"]))


def start_cli(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "rlm_pipelines", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what, proc=None, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the CLI ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def sandbox_folders(root: Path):
    return sorted(root.glob("rlm-*")) if root.is_dir() else []


# --------------------------------------------------------------------------- point 8


def test_two_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    for attempt in range(4):  # until both really start in the same second (the case that collided)
        cwd = tmp_path / f"try{attempt}"
        cwd.mkdir()
        procs = [start_cli(OFFLINE, cwd) for _ in range(2)]
        outs = [proc.communicate(timeout=600) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
        folders = sorted((cwd / "outputs" / "runs" / "needles").glob("*/*"))
        if len({folder.name[:8] for folder in folders}) == 1:
            break
    assert len(folders) == 2, folders
    assert folders[0].name[:8] == folders[1].name[:8]  # same second, two folders
    runs = [json.loads((folder / "run.json").read_text()) for folder in folders]
    assert runs[0]["id"] != runs[1]["id"]
    for folder, run in zip(folders, runs):
        assert run["status"] == "ok"
        assert json.loads((folder / "summary.json").read_text())["run_id"] == run["id"]
        assert (folder / "result.json").is_file() and (folder / "viewer" / "index.html").is_file()


def test_a_folder_that_holds_a_run_is_refused(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    record = json.dumps({"id": "earlier", "status": "ok"})
    (folder / "run.json").write_text(record)
    done = cli([*OFFLINE, f"hydra.run.dir={folder}"], tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "already holds another run's record" in done.stderr
    assert (folder / "run.json").read_text() == record
    assert not (folder / "summary.json").exists()
    assert not (folder / ".hydra").exists()  # refused before Hydra writes into it


# --------------------------------------------------------------------------- point 9 (records)


def test_a_lone_surrogate_in_a_model_reply_is_recorded_as_a_replacement_character(tmp_path):
    def reply(request):  # valid JSON on the wire: "\ud800" as an escape
        return needles_reply(request, lambda text: text.replace("[[ ## reasoning ## ]]\n", "[[ ## reasoning ## ]]\n\ud800 ", 1))

    with OpenAIServer(reply=reply) as server:
        done = cli(local_model(server), tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir_of(tmp_path)
    text = (folder / "run.json").read_bytes().decode("utf-8")  # valid UTF-8
    run = json.loads(text)
    assert run["status"] == "ok"
    assert run["root"]["iterations"][0]["reasoning"].startswith("\ufffd")
    assert json.loads((folder / "summary.json").read_text())["status"] == "ok"
    assert (folder / "viewer" / "data.js").is_file()


# --------------------------------------------------------------------------- point 10


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_ends_an_in_process_run_as_terminated_and_cleans_its_sandbox(tmp_path, signum):
    sandboxes = tmp_path / "sbx"
    with OpenAIServer(reply=SLEEPING_CELL) as server:
        proc = start_cli([*local_model(server), f"sandbox.root_dir={sandboxes}"], tmp_path)
        wait_for(lambda: sandbox_folders(sandboxes) and server.requests, "a sandbox and a cell", proc)
        time.sleep(2)  # the cell is running
        mine = descendants(proc.pid)
        assert mine
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert f"terminated ({signal.Signals(signum).name})" in err
    folder = run_dir_of(tmp_path)
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "terminated"
    assert json.loads((folder / "summary.json").read_text())["status"] == "terminated"
    assert sandbox_folders(sandboxes) == []
    assert still_running(mine) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs of the test's own (the host's disks are never filled)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_keeps_the_last_good_record_and_says_disk_full(tmp_path, small_disk):
    roots = []

    def reply(request):
        if request["model"] != "nd-sub":
            roots.append(1)
            if len(roots) == 2:  # after the first iteration was recorded: the disk fills up
                fill(small_disk)
        return needles_reply(request)

    with OpenAIServer(reply=reply) as server:
        done = cli([*local_model(server), f"orchestration.outputs_dir={small_disk}",
                    f"sandbox.root_dir={tmp_path / 'sbx'}"], tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: disk full:" in done.stderr
    folder = next((small_disk / "runs" / "needles").glob("*/*"))
    run = json.loads((folder / "run.json").read_text())  # the last good record, whole
    assert run["status"] == "running"
    assert len(run["root"]["iterations"]) == 1
    assert not [p.name for p in folder.rglob("*.tmp")]
    # the next run (with space again) says what became of it
    (small_disk / "filler").unlink()
    assert cli([*OFFLINE, f"orchestration.outputs_dir={small_disk}", "task.documents=10"], tmp_path,
               timeout=600).returncode == 0
    assert json.loads((folder / "run.json").read_text())["status"] == "crashed"


def test_after_sigkill_the_next_run_marks_the_record_crashed_and_cleanup_removes_only_dead_sandboxes(tmp_path):
    sandboxes = tmp_path / "sbx"
    outputs = tmp_path / "outputs"
    with OpenAIServer(reply=SLEEPING_CELL) as server:
        args = [*local_model(server), f"sandbox.root_dir={sandboxes}", f"orchestration.outputs_dir={outputs}"]
        killed = start_cli(args, tmp_path)
        wait_for(lambda: sandbox_folders(sandboxes) and server.requests, "the first run's sandbox", killed)
        left = sandbox_folders(sandboxes)
        killed.kill()
        killed.communicate(timeout=60)
        dead = run_dir_of(tmp_path)
        assert json.loads((dead / "run.json").read_text())["status"] == "running"
        assert sandbox_folders(sandboxes) == left  # SIGKILL: nothing could clean up

        live = start_cli(args, tmp_path)
        try:
            wait_for(lambda: len(sandbox_folders(sandboxes)) == 2, "the second run's sandbox", live)
            run = json.loads((dead / "run.json").read_text())
            assert run["status"] == "crashed", run["status"]
            summary = json.loads((dead / "summary.json").read_text())
            assert (summary["status"], summary["run_id"]) == ("crashed", run["id"])
            cleaned = subprocess.run([sys.executable, "-m", "rlm_pipelines.sandbox", "cleanup", "--local",
                                      "--root", str(sandboxes)], capture_output=True, text=True, timeout=120)
            assert cleaned.returncode == 0, cleaned.stderr
            remaining = sandbox_folders(sandboxes)
            assert len(remaining) == 1 and remaining[0] not in left  # the live run's sandbox is kept
            assert f"removed {left[0]}" in cleaned.stdout
        finally:
            live.send_signal(signal.SIGTERM)
            live.communicate(timeout=120)
    assert live.returncode == 143
    assert sandbox_folders(sandboxes) == []


# --------------------------------------------------------------------------- the small ones


def test_a_document_run_records_its_result_and_the_final_line_says_time_and_score(tmp_path):
    done = cli([*OFFLINE, "task.documents=20"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = run_dir_of(tmp_path)
    run = json.loads((folder / "run.json").read_text())
    result = json.loads((folder / "result.json").read_text())
    assert result["counts"]
    assert run["root"]["result"] == result == run["result"]
    final = done.stderr.strip().splitlines()[-1]
    found = re.search(r"score (\d\.\d\d), (\d+\.\d) s in all \(the run (\d+\.\d) s\)", final)
    assert found, final
    assert float(found[1]) == json.loads((folder / "summary.json").read_text())["score"]
    assert float(found[2]) > float(found[3])  # start-up counted in the total
