"""Every option of every config group composes; bad overrides fail at compose time with Hydra's message."""

import pytest
from omegaconf import OmegaConf

from rlm_pipelines.config import ModelSpec, RunConfig, register_configs
from rlm_pipelines.engines.base import engine_class
from rlm_pipelines.paths import conf_dir
from rlm_pipelines.tasks import discover, register_task_schemas, resolve
from tests.conftest import composed

CONF = conf_dir()
register_configs()
TASKS = discover()
register_task_schemas(TASKS, CONF)
GROUPS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
          for group in ("engine", "task", "model", "sandbox", "limits")}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_option_composes_and_validates(group, option):
    cfg = composed(f"{group}={option}")
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, RunConfig)
    assert isinstance(typed.model, ModelSpec)
    task, params = resolve(cfg, TASKS)
    assert task.name == cfg.task.name
    if group == "model":
        assert typed.model.name == option
        assert typed.model.model
    if group == "engine":
        assert engine_class(typed.engine).name == option


@pytest.mark.parametrize("task", sorted(GROUPS["task"]))
def test_each_task_runs_on_the_engine_its_yaml_names_unless_overridden(task):
    engine = engine_class(composed(f"task={task}").engine)
    assert isinstance(TASKS[task], engine.task_type)
    assert composed(f"task={task}", "engine=repo").engine.name == "repo"  # the command line wins


def test_groups_have_what_the_docs_promise():
    assert {"monte_cristo", "doc_qa"} <= set(GROUPS["task"])
    assert {"gemini_flash", "claude_sonnet", "gpt_mini", "local", "scripted"} <= set(GROUPS["model"])
    assert {"default", "small", "large"} <= set(GROUPS["limits"])
    cfg = composed("model=gemini_flash")
    assert cfg.model.model == "openrouter/google/gemini-3-flash-preview"
    assert composed("model=claude_sonnet").model.model == "openrouter/anthropic/claude-sonnet-4.6"
    scripted = OmegaConf.to_object(composed("model=scripted", "task=doc_qa"))
    assert scripted.model.model == "scripted/doc_qa"
    assert scripted.model.sub.model == "scripted/doc_qa.sub"


def test_every_limit_and_sandbox_key_is_commented_in_its_yaml():
    for path in (CONF / "limits" / "default.yaml", CONF / "sandbox" / "local.yaml"):
        for line in path.read_text().splitlines():
            if line and not line.startswith((" ", "#")) and ":" in line and not line.rstrip().endswith(":"):
                assert "#" in line, f"{path.name}: {line!r} says nothing about what it bounds"


@pytest.mark.parametrize("override,message", [
    ("task.bogus=1", "Key 'bogus' not in 'MonteCristoParams'"),
    ("limits.max_iterations=lots", "could not be converted to Integer"),
    ("limits.nonsense=3", "Key 'nonsense' not in 'LimitsConfig'"),
    ("model.temperature=hot", "could not be converted to Float"),
    ("sandbox.network=perhaps", "is not a valid bool"),
    ("task=nope", "Could not find 'task/nope'"),
    ("model=gpt9", "Could not find 'model/gpt9'"),
])
def test_bad_overrides_fail_at_compose_time(override, message):
    with pytest.raises(Exception) as caught:
        OmegaConf.to_object(composed(override))
    assert message in str(caught.value) or message in str(caught.value.__cause__)


@pytest.mark.parametrize("overrides,message", [
    (("sandbox=daytona", "sandbox.memory_mb=1"), "Key 'memory_mb' not in 'DaytonaSandboxConfig'"),
    (("sandbox=local", "sandbox.isolaton=bwrap"), "Key 'isolaton' not in 'LocalSandboxConfig'"),
    (("sandbox=local", "sandbox.daytona.checkout=clone"), "Key 'daytona' not in 'LocalSandboxConfig'"),
])
def test_each_sandbox_takes_only_its_own_keys(overrides, message):
    with pytest.raises(Exception) as caught:
        composed(*overrides)
    assert message in str(caught.value) or message in str(caught.value.__cause__)


def test_each_sandbox_composes_to_its_own_schema():
    from rlm_pipelines.config import DaytonaSandboxConfig, LocalSandboxConfig
    from rlm_pipelines.pipeline import _typed

    local = OmegaConf.to_object(composed("sandbox=local", "sandbox.memory_mb=512")).sandbox
    assert isinstance(local, LocalSandboxConfig)
    assert local.memory_mb == 512
    assert not hasattr(local, "daytona")
    daytona = composed("sandbox=daytona", "sandbox.daytona.checkout=upload")
    assert isinstance(OmegaConf.to_object(daytona).sandbox, DaytonaSandboxConfig)
    again = _typed(OmegaConf.to_container(daytona, resolve=True)).sandbox  # as the pipeline reads it back
    assert isinstance(again, DaytonaSandboxConfig)
    assert again.daytona.checkout == "upload"

