"""Pipeline steps without the Prefect engine: the same steps, chained in-process."""

import json

import pytest

from rlm_pipelines.orchestration.inprocess import run_steps
from rlm_pipelines.pipeline import is_transient_infra
from rlm_pipelines.models import ModelError
from rlm_pipelines.sandbox import SandboxConfigError, SandboxStartError
from tests.conftest import scripted_config


def test_doc_qa_answers_from_a_folder_of_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ships.md").write_text("The Pharaon arrived at Marseilles. Its cargo was indigo and cochineal.")
    (docs / "people.txt").write_text("Edmond Dantès was the first mate of the Pharaon. He loved Mercédès.")
    (docs / "noise.txt").write_text("Nothing here matters at all.")
    run_dir = tmp_path / "run"
    summary = run_steps(scripted_config("task=doc_qa", f"task.documents=[{docs}]",
                               "task.question='Who was the first mate of the Pharaon?'"), str(run_dir))
    assert summary["status"] == "ok"
    answer = json.loads((run_dir / "result.json").read_text())["answer"]
    assert "Edmond Dantès was the first mate" in answer
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "ok"
    assert run["usage"]["llm_calls"] == 3 + 3 + 1  # 3 turns, 3 documents, 1 combine
    assert len(run["root"]["iterations"][1]["children"]) == 3


def raised_from(cause: BaseException, wrapper: type = RuntimeError) -> BaseException:
    """`wrapper` raised while handling `cause` (`raise ... from cause`), as the engine step sees it."""
    try:
        try:
            raise cause
        except BaseException as caught:
            raise wrapper("cannot start the sandbox") from caught
    except BaseException as wrapped:
        return wrapped


def test_only_infrastructure_failures_are_retried():
    transient = ModelError("model x failed after 4 attempts: 503")
    transient.transient = True
    assert is_transient_infra(transient)
    assert is_transient_infra(raised_from(SandboxStartError("bwrap: cannot create namespace")))
    assert not is_transient_infra(ModelError("model x failed: 401 invalid key"))
    assert not is_transient_infra(NameError("name 'docs' is not defined"))


def test_a_sandbox_that_can_never_start_is_not_retried():
    assert not is_transient_infra(SandboxConfigError("sandbox.isolation=bwrap but bwrap is not installed"))
    assert not is_transient_infra(raised_from(SandboxConfigError("checkout=clone but the network is locked")))
    # a start error caused by a setup that cannot work is not worth another try either
    assert not is_transient_infra(raised_from(SandboxConfigError("no bwrap"), SandboxStartError))


def test_isolation_bwrap_without_bwrap_is_a_config_error(monkeypatch):
    import shutil

    from rlm_pipelines.config import LocalSandboxConfig
    from rlm_pipelines.sandbox import check_sandbox, make_sandbox
    from rlm_pipelines.sandbox import local

    real_which = shutil.which
    monkeypatch.setattr(local.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name))
    local._bwrap_problem.cache_clear()
    try:
        with pytest.raises(SandboxConfigError, match="bwrap is not installed") as caught:
            make_sandbox(LocalSandboxConfig(isolation="bwrap"))
        assert not isinstance(caught.value, SandboxStartError)
        assert not is_transient_infra(caught.value)
        with pytest.raises(SandboxConfigError):
            check_sandbox(LocalSandboxConfig(isolation="bwrap"))
        with pytest.raises(SandboxConfigError, match="auto, bwrap or none"):
            make_sandbox(LocalSandboxConfig(isolation="bubblewrap"))
    finally:
        monkeypatch.undo()
        local._bwrap_problem.cache_clear()


def test_a_sandbox_that_cannot_start_is_retried_then_recorded(tmp_path, capsys):
    run_dir = tmp_path / "run"
    python = tmp_path / "py" / "bin" / "python"  # runs, but no REPL server starts in it
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'no REPL today' >&2\nexit 3\n")
    python.chmod(0o755)
    overrides = ("task=doc_qa", f"task.documents=[{__file__}]", "task.question=what",
                 f"sandbox.python={python}", "orchestration.retries=1", "orchestration.retry_delay_s=0",
                 "orchestration.progress=true")
    try:
        run_steps(scripted_config(*overrides), str(run_dir))
        raise AssertionError("the run should fail")
    except Exception as exc:
        assert "cannot start the sandbox" in str(exc)
    assert "retrying the engine step" in " ".join(capsys.readouterr().err.split())  # the console wraps lines
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "error"
    assert "cannot start the sandbox" in run["error"]
