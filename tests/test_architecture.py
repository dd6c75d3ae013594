"""docs/architecture.md stays true: every path it names exists, and the import boundaries it states hold
(Prefect only in orchestration/, the Daytona SDK only in sandbox/daytona.py, litellm only in models/)."""

import ast
import re

import pytest

from tests.conftest import PROJECT

DOC = PROJECT / "docs" / "architecture.md"
CODE = [p for folder in ("rlm_pipelines", "viewer", "tasks", "conf") for p in (PROJECT / folder).rglob("*.py")]
BOUNDARIES = {"prefect": "rlm_pipelines/orchestration/", "daytona": "rlm_pipelines/sandbox/daytona.py",
              "litellm": "rlm_pipelines/models/"}


TOP = ("rlm_pipelines/", "conf/", "viewer/", "tasks/", "tests/", "benchmarks/", "scripts/", "docs/")


def named_paths() -> set[str]:
    """Backticked paths in the doc: full ones (`rlm_pipelines/engines/`, `conf/engine/`), and in a table row
    whose first cell names a folder, the files and sub-folders its other cells name relative to it."""
    text = DOC.read_text()
    paths = {p for p in re.findall(r"`([\w./-]+)`", text) if p.startswith(TOP)}
    for folder, cells in re.findall(r"^\| `([\w/]+/)` \|(.*)$", text, re.M):
        for name in re.findall(r"`([\w./-]+(?:/|\.py|\.yaml))`", cells):
            paths.add(name if name.startswith(TOP) else folder + name)
    return paths


def test_the_architecture_doc_names_only_paths_that_exist():
    paths = named_paths()
    assert len(paths) > 25  # the doc names the folders and their files
    missing = sorted(p for p in paths if not (PROJECT / p).exists())
    assert missing == []


def imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("library,home", sorted(BOUNDARIES.items()))
def test_a_vendor_library_is_imported_in_one_place_only(library, home):
    outside = sorted(str(p.relative_to(PROJECT)) for p in CODE
                     if library in imports(p) and not str(p.relative_to(PROJECT)).startswith(home))
    assert outside == []


def test_the_pipeline_and_the_engines_never_import_the_orchestration():
    for path in [PROJECT / "rlm_pipelines" / "pipeline.py", *(PROJECT / "rlm_pipelines" / "engines").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.startswith("rlm_pipelines.orchestration") for m in modules), path
