"""repo_todos: investigate a repo's TODO comments module by module with sub-agents, judge which is easiest,
fix it; the result is the findings and a patch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlm_pipelines.tasks import RepoParams, RepoTask
from rlm_tasks.repo_todos import script

DEFAULT_PROMPT = (
    "Find the TODO and FIXME comments of this repository. Investigate them package by package with "
    "sub-agents (rlm_query_batched, one per top-level package; they may split further by module), having each "
    "judge how easy every TODO is to fix (difficulty 1 = trivial ... 5 = hard) and why. Then pick the easiest "
    "one, fix it with edit_file, check the diff, and end with FINAL_VAR of a dict: todos (every judged TODO "
    "with file, line, todo, difficulty, reason), easiest, and what you changed.")


@dataclass
class RepoTodosParams(RepoParams):
    prompt: str = DEFAULT_PROMPT


class RepoTodos(RepoTask):
    name = "repo_todos"
    params = RepoTodosParams

    def script(self, params: RepoTodosParams) -> Any:
        return script.policy()


task = RepoTodos()
