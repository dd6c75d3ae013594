"""Bad settings and bad input fail up front (issue 11, points 16 and the task.repo checks): the real CLI exits
2 before any sandbox (or Prefect) starts, naming the key and what it may be."""

import dataclasses
import typing

import pytest

from rlm_pipelines import config as config_module
from tests.conftest import cli

BAD_SETTINGS = [
    ("sandbox.memory_mb=-1", "sandbox.memory_mb=-1 is out of range: it must be >= 128"),
    ("sandbox.memory_mb=0", "sandbox.memory_mb=0 is out of range: it must be >= 128"),
    ("sandbox.file_size_mb=-5", "sandbox.file_size_mb=-5 is out of range: it must be >= 1"),
    ("sandbox.cpu_seconds=-1", "sandbox.cpu_seconds=-1 is out of range: it must be >= 1"),
    ("sandbox.max_processes=0", "sandbox.max_processes=0 is out of range: it must be >= 8"),
    ("sandbox.repl.host_workers=0", "sandbox.repl.host_workers=0 is out of range: it must be >= 1"),
    ("sandbox.repl.cell_timeout_s=0", "sandbox.repl.cell_timeout_s=0.0 is out of range: it must be > 0"),
    ("sandbox.repl.max_message_mb=0", "sandbox.repl.max_message_mb=0 is out of range: it must be >= 1"),
    ("limits.max_llm_calls=0", "limits.max_llm_calls=0 is out of range: it must be >= 1"),
    ("limits.concurrency=0", "limits.concurrency=0 is out of range: it must be >= 1"),
    ("limits.max_depth=-1", "limits.max_depth=-1 is out of range: it must be >= 0"),
    ("limits.wall_time_s=-5", "limits.wall_time_s=-5.0 is out of range: it must be > 0"),
    ("limits.max_input_mb=0", "limits.max_input_mb=0 is out of range: it must be > 0"),
    ("limits.max_patch_mb=0", "limits.max_patch_mb=0 is out of range: it must be > 0"),
    ("limits.max_record_mb=-1", "limits.max_record_mb=-1 is out of range: it must be > 0"),
    ("model.temperature=3", "model.temperature=3.0 is out of range: it must be >= 0 and <= 2"),
    ("limits.max_cost_usd=nan", "limits.max_cost_usd=nan is out of range: it must be > 0"),
]


def fails_up_front(args, tmp_path, message, env=None):
    """The CLI exits 2 with `message`, no sandbox folder and no run record made."""
    sandboxes = tmp_path / "sandboxes"
    done = cli([*args, f"sandbox.root_dir={sandboxes}"], tmp_path, env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not sandboxes.exists()
    assert not list(tmp_path.glob("outputs/runs/*/*/*/run.json"))
    return done


@pytest.mark.parametrize("setting,message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_setting_out_of_range_fails_before_anything_starts(setting, message, tmp_path):
    fails_up_front(["model=scripted", setting], tmp_path, message)


def test_a_daytona_option_out_of_range_fails_before_anything_starts(tmp_path):
    fails_up_front(["model=scripted", "sandbox=daytona", "sandbox.daytona.cpu=0"], tmp_path,
                   "sandbox.daytona.cpu=0 is out of range: it must be >= 1", env={"DAYTONA_API_KEY": "k"})


def test_a_run_opened_without_the_cli_checks_ranges_too(tmp_path):
    from rlm_pipelines.pipeline import open_run
    from tests.conftest import scripted_config

    config = scripted_config("limits.concurrency=0")
    with pytest.raises(ValueError, match=r"limits.concurrency=0 is out of range: it must be >= 1"):
        open_run(config, str(tmp_path / "run"))


def _numeric_keys(schema, prefix=""):
    """Every int/float field (optional or not) of a config dataclass, recursively, as its run-config key."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        kind = hints[item.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
        if dataclasses.is_dataclass(kind):
            yield from _numeric_keys(kind, f"{prefix}{item.name}.")
        elif kind in (int, float):
            yield f"{prefix}{item.name}"


def test_every_numeric_setting_has_a_range():
    schemas = [(config_module.RunConfig, ""), (config_module.LocalSandboxConfig, "sandbox."),
               (config_module.DaytonaSandboxConfig, "sandbox.")]
    keys = {key for schema, prefix in schemas for key in _numeric_keys(schema, prefix)}
    assert "limits.max_input_mb" in keys and "sandbox.daytona.repl_port" in keys
    assert sorted(keys - set(config_module.RANGES)) == []
    assert sorted(set(config_module.RANGES) - keys) == []  # no stale entries either


# --------------------------------------------------------------------------- input size and task.repo


def test_an_input_over_max_input_mb_fails_up_front(tmp_path):
    source = tmp_path / "big.txt"
    with open(source, "wb") as handle:  # 300 MB, sparse: the check reads the size, never the text
        handle.truncate(300 * 2**20)
    done = fails_up_front(["model=scripted", f"task.source={source}", "limits.max_input_mb=256"], tmp_path,
                          "over limits.max_input_mb=256")
    assert "task.source" in done.stderr and "300 MB" in done.stderr


def test_documents_over_max_input_mb_fail_up_front(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.txt"):
        (docs / name).write_bytes(b"x" * 700_000)
    done = fails_up_front(["task=doc_qa", "model=scripted", "task.question=why", f"task.documents=[{docs}]",
                           "limits.max_input_mb=1"], tmp_path, "over limits.max_input_mb=1")
    assert "task.documents" in done.stderr


def test_a_generated_input_over_max_input_mb_fails_up_front(tmp_path):
    fails_up_front(["task=needles", "model=scripted", "task.documents=1000", "task.doc_chars=2000000"], tmp_path,
                   "(largest: task.documents x task.doc_chars, 1907 MB), over limits.max_input_mb=256")


@pytest.mark.parametrize("repo,message", [
    ("/nonexistent", "task.repo='/nonexistent' is not a folder on this machine nor a git URL"),
    ("-oProxyCommand=x", "task.repo='-oProxyCommand=x' starts with '-'"),
    ("https:///owner/repo", "is not a valid git URL"),
    ("ftp://host/repo", "is not a valid git URL"),
])
def test_a_bad_task_repo_fails_fast(repo, message, tmp_path):
    fails_up_front(["task=repo_todos", "model=scripted", f"task.repo='{repo}'"], tmp_path, message)


def test_a_folder_that_is_not_a_git_repository_fails_up_front(tmp_path):
    (tmp_path / "plain").mkdir()
    fails_up_front(["task=repo_todos", "model=scripted", f"task.repo={tmp_path / 'plain'}"], tmp_path,
                   "is a folder but not a git repository")
