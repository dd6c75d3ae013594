"""The document engine: `dspy.RLM` over our sandbox interpreter.

`SandboxRLM` is dspy's RLM with two changes a real run needs:
- `llm_query_batched` fans out with `batch_concurrency` workers (dspy fixes 8, which makes a 64-prompt
  batch eight round trips long); the call budget is still reserved for the whole batch at once, atomically.
- a model reply that cannot be parsed into `reasoning` + `code` becomes an observation the model sees on
  its next turn, instead of an exception that ends the run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import dspy
from dspy.utils.exceptions import AdapterParseError

from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.engines import prompts
from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory


class SandboxRLM(dspy.RLM):
    def __init__(self, signature: Any, *, sandbox: Optional[SandboxConfig] = None, batch_concurrency: int = 32,
                 interpreter_factory: Optional[Callable[[], Any]] = None, **kwargs: Any):
        factory = interpreter_factory or SandboxInterpreterFactory(sandbox or SandboxConfig())
        super().__init__(signature, interpreter_factory=factory, **kwargs)
        self.batch_concurrency = batch_concurrency

    def _make_llm_tools(self, budget: Any = None, max_workers: int = 8) -> dict[str, Callable]:
        return super()._make_llm_tools(budget, max_workers=max(max_workers, self.batch_concurrency))

    def _execute_iteration(self, repl: Any, variables: Any, history: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._execute_iteration(repl, variables, history, *args, **kwargs)
        except AdapterParseError as exc:
            detail = f"the reply was: {_clip(exc.lm_response or '')!r}"
            return history.append(reasoning="", code="", output=prompts.load("no_code").format(detail=detail))


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
