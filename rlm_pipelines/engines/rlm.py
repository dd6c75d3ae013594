"""`dspy.RLM` over our sandbox interpreter, for the document engine (imports dspy: loaded only when a run
uses it).

`SandboxRLM` is dspy's RLM with what a real run needs:
- `llm_query_batched` fans out with `batch_concurrency` workers (dspy fixes 8, which makes a 64-prompt
  batch eight round trips long); the call budget is still reserved for the whole batch at once, atomically.
- a model reply that cannot be parsed into `reasoning` + `code` becomes an observation the model sees on
  its next turn, instead of an exception that ends the run.
- an optional `Observer` sees every iteration and every `llm_query` (the run tree, the console), and may
  stop the run between iterations when a budget is spent.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any, Callable, Optional, Protocol

import dspy
from dspy.utils.exceptions import AdapterParseError

from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.engines import prompts
from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory
from rlm_pipelines.models import Usage
from rlm_pipelines.text import clip

PREVIEW_CHARS = 1000  # dspy's REPLVariable preview


class Observer(Protocol):
    def before_iteration(self, index: int) -> None:
        """Raise to stop the run (e.g. a budget is spent)."""

    def after_iteration(self, index: int, step: dict[str, Any], duration_s: float) -> None: ...

    def before_sub_calls(self, count: int) -> None:
        """Raise to refuse the calls; the model sees the message."""

    def sub_calls(self, prompts: list[str], answers: list[str]) -> None: ...

    def fan_out(self, total: int) -> Any:
        """A context manager around a batch (the console shows a progress bar)."""


class SandboxRLM(dspy.RLM):
    def __init__(self, signature: Any, *, sandbox: Optional[SandboxConfig] = None, batch_concurrency: int = 32,
                 interpreter_factory: Optional[Callable[[], Any]] = None, observer: Optional[Observer] = None,
                 **kwargs: Any):
        factory = interpreter_factory or SandboxInterpreterFactory(sandbox or SandboxConfig())
        super().__init__(signature, interpreter_factory=factory, **kwargs)
        self.batch_concurrency = batch_concurrency
        self.observer = observer

    def _make_llm_tools(self, budget: Any = None, max_workers: int = 8) -> dict[str, Callable]:
        tools = super()._make_llm_tools(budget, max_workers=max(max_workers, self.batch_concurrency))
        observer = self.observer
        if observer is None:
            return tools
        query, batched = tools["llm_query"], tools["llm_query_batched"]

        def llm_query(prompt: str) -> str:
            """Query the LLM with a prompt string."""
            observer.before_sub_calls(1)
            answer = query(prompt)
            observer.sub_calls([prompt], [answer])
            return answer

        def llm_query_batched(prompts: list[str]) -> list[str]:
            """Query prompts concurrently; one answer per prompt, in order."""
            observer.before_sub_calls(len(prompts))
            with observer.fan_out(len(prompts)):
                answers = batched(prompts)
            observer.sub_calls(list(prompts), answers)
            return answers

        return {"llm_query": llm_query, "llm_query_batched": llm_query_batched}

    def _build_variables(self, **input_args: Any) -> list[Any]:
        """dspy's, with each list or dict input's preview taken from its JSON text streamed in chunks: dspy
        builds the whole text of every input to show 1,000 characters of it (a 200 MB book: 200 MB more)."""
        variables = super()._build_variables(**{k: v for k, v in input_args.items() if not isinstance(v, (list, dict))})
        for name, value in input_args.items():
            if isinstance(value, (list, dict)):
                empty = dspy.primitives.repl_types.REPLVariable.from_value(name, type(value)(),
                                                                            self.signature.input_fields.get(name))
                total, preview = _json_preview(value, PREVIEW_CHARS)
                variables.append(empty.model_copy(update={"total_length": total, "preview": preview}))
        order = list(input_args)
        return sorted(variables, key=lambda variable: order.index(variable.name))

    def _execute_iteration(self, repl: Any, variables: Any, history: Any, iteration: int, *args: Any,
                           **kwargs: Any) -> Any:
        if self.observer is not None:
            self.observer.before_iteration(iteration)
        started = time.perf_counter()
        try:
            result = super()._execute_iteration(repl, variables, history, iteration, *args, **kwargs)
        except AdapterParseError as exc:
            detail = f"the reply was: {clip(exc.lm_response or '', 300)!r}"
            result = history.append(reasoning="", code="", output=prompts.load("no_code").format(detail=detail))
        if self.observer is not None:
            steps = result.trajectory if isinstance(result, dspy.Prediction) else [e.model_dump() for e in result]
            self.observer.after_iteration(iteration, steps[-1], time.perf_counter() - started)
        return result


class TreeObserver:
    """Connects a SandboxRLM to the run tree, the console and the run's budget."""

    def __init__(self, tree: Any, agent_id: str, budget: Any, progress: Any, root_lm: Any, max_iters: int):
        self.tree, self.agent_id, self.budget, self.progress = tree, agent_id, budget, progress
        self.root_lm, self.max_iters = root_lm, max_iters
        self._seen = Usage()  # the run's totals after the previous iteration

    def before_iteration(self, index: int) -> None:
        self.budget.check()

    def after_iteration(self, index: int, step: dict[str, Any], duration_s: float) -> None:
        call = self.root_lm.last_call()
        output = step.get("output", "")
        usage = self.budget.ledger.snapshot()
        failed = output.startswith("[Error]") or "Traceback (most recent call last)" in output
        totals = Usage.from_snapshot(usage)
        self.tree.set_usage(totals.as_tree())
        # this iteration's calls: the agent's own turn and the llm_query calls its code made
        delta, self._seen = totals.minus(self._seen), totals
        self.tree.add_iteration(self.agent_id, prompt=_render(call.get("messages")),
                                response=_first(call.get("outputs")), reasoning=step.get("reasoning", ""),
                                code=step.get("code", ""), stdout=output, stderr=None,
                                error=output if failed else None, duration_s=round(duration_s, 3),
                                usage=delta.as_tree())
        self.progress.iteration(self.tree.run["task"], index + 1, self.max_iters, duration_s, usage,
                                "error" if failed else "ok")

    def before_sub_calls(self, count: int) -> None:
        from rlm_pipelines.budget import BudgetExceeded

        try:
            self.budget.check()
        except BudgetExceeded as exc:
            raise RuntimeError(f"no more llm_query calls: {exc}") from None

    def sub_calls(self, prompts_: list[str], answers: list[str]) -> None:
        for prompt, answer in zip(prompts_, answers):
            self.tree.add_llm_call(self.agent_id, prompt, answer)

    def fan_out(self, total: int) -> Any:
        return self.progress.fan_out(f"llm_query_batched x {total}", total)


def _json_preview(value: Any, limit: int) -> tuple[int, str]:
    """(length, head + "..." + tail) of `json.dumps(value, indent=2)`, as dspy's previews are, without holding
    more of that text than one chunk and the preview."""
    from dspy.adapters.utils import serialize_for_json

    head, tail, total = "", collections.deque(), 0
    tail_chars, head_chars = limit - limit // 2, limit // 2
    for chunk in json.JSONEncoder(indent=2).iterencode(serialize_for_json(value)):
        total += len(chunk)
        if len(head) < limit + 1:
            head += chunk[:limit + 1 - len(head)]
        tail.append(chunk[-tail_chars:])
        while sum(map(len, tail)) - len(tail[0]) >= tail_chars:
            tail.popleft()
    if total <= limit:
        return total, head
    return total, head[:head_chars] + "..." + "".join(tail)[-tail_chars:]


def _render(messages: Any) -> Optional[str]:
    if not messages:
        return None
    return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in messages if isinstance(m, dict))


def _first(outputs: Any) -> Optional[str]:
    if isinstance(outputs, list) and outputs:
        first = outputs[0]
        return first.get("text") if isinstance(first, dict) else str(first)
    return None
