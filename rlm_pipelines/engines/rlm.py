"""`dspy.RLM` over our sandbox interpreter, for the document engine (imports dspy: loaded only when a run
uses it).

`SandboxRLM` is dspy's RLM with what a real run needs:
- `llm_query_batched` fans out with `batch_concurrency` workers (dspy fixes 8, which makes a 64-prompt
  batch eight round trips long); the call budget is still reserved for the whole batch at once, atomically.
- a model reply that cannot be parsed into `reasoning` + `code` becomes an observation the model sees on
  its next turn, instead of an exception that ends the run; so do `code=None` or empty code, and a reply
  cut at max_tokens (finish_reason `length`: not run). The model's own turns are read by `QuirksAdapter`
  (rlm_adapter.py) and their code by `replies.cell` (think tags, several blocks, a SUBMIT written before
  the output was seen): the policies are in README, "Model replies".
- an optional `Observer` sees every iteration (the run tree, the console) and may stop the run between
  iterations when a budget is spent.
- every model call the sandbox makes, through `llm_query`, `llm_query_batched` or the sub-agents dspy 3.4.1
  installs in the sandbox (`dspy.Predict`, `dspy.ChainOfThought`, `dspy.ReAct(V2)`, a nested `dspy.RLM`
  ... built by its facade tools, all on `sub_lm`), is checked against the run's budget before it is made
  (`Observer.before_sub_calls`, from dspy's per-run call budget, which every such call reserves), and the
  sub-model's `CallHook` (`TreeObserver`) records it with the API it came through (`api_label()`).
"""

from __future__ import annotations

import collections
import contextvars
import functools
import json
import time
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import dspy
from dspy.predict.rlm import _strip_code_fences
from dspy.primitives.facade import CALL_TOOL, CONSTRUCT_TOOL
from dspy.primitives.code_interpreter import FinalOutput
from dspy.utils.exceptions import AdapterParseError

from rlm_pipelines.config import ModelSpec, SandboxConfig
from rlm_pipelines.engines import prompts, replies
from rlm_pipelines.engines.rlm_adapter import QuirksAdapter
from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory
from rlm_pipelines.models import Usage
from rlm_pipelines.models.usage import CallRecord
from rlm_pipelines.text import clip

PREVIEW_CHARS = 1000  # dspy's REPLVariable preview

# The sandbox API the model call in progress came through ("llm_query", "dspy.Predict", ...). A context
# variable: host calls run on pool threads with the cell's context, dspy's batch copies it to its workers.
_api: contextvars.ContextVar[str] = contextvars.ContextVar("rlm_sandbox_api", default="sandbox")


def api_label() -> str:
    """The sandbox API of the model call in progress (what the run tree and the viewer show)."""
    return _api.get()


@runtime_checkable
class RemembersCalls(Protocol):
    """An LM that tells the calling thread's latest call (`RecordingLM`): its finish_reason among others."""

    def last_call(self) -> dict[str, Any]: ...


class Observer(Protocol):
    def before_iteration(self, index: int) -> None:
        """Raise to stop the run (e.g. a budget is spent)."""

    def after_iteration(self, index: int, step: dict[str, Any], duration_s: float) -> None: ...

    def before_sub_calls(self, count: int) -> None:
        """Raise to refuse the calls (any API, `api_label()`); the model sees the message."""

    def refused(self, limit: str, count: int, message: str) -> None:
        """`count` calls were refused by dspy's call budget (`limit`: the limit's key, max_llm_calls)."""

    def fan_out(self, total: int) -> Any:
        """A context manager around a batch (the console shows a progress bar)."""


class SandboxRLM(dspy.RLM):
    def __init__(self, signature: Any, *, sandbox: Optional[SandboxConfig] = None, batch_concurrency: int = 32,
                 interpreter_factory: Optional[Callable[[], Any]] = None, observer: Optional[Observer] = None,
                 spec: Optional[ModelSpec] = None, **kwargs: Any):
        """`spec`: the root model's config, for its quirks (prompt settings, `early_final`)."""
        factory = interpreter_factory or SandboxInterpreterFactory(sandbox or SandboxConfig())
        super().__init__(signature, interpreter_factory=factory, **kwargs)
        self.batch_concurrency = batch_concurrency
        self.observer = observer
        self.spec = spec or ModelSpec()
        self.adapter = QuirksAdapter(self.spec.extra_instructions, self.spec.system_prompt)

    def _make_llm_tools(self, budget: Any = None, max_workers: int = 8) -> dict[str, Callable]:
        observer = self.observer
        if observer is not None and budget is not None:
            budget = _ObservedBudget(budget, observer)
        tools = super()._make_llm_tools(budget, max_workers=max(max_workers, self.batch_concurrency))
        if observer is None:
            return tools
        query, batched = tools["llm_query"], tools["llm_query_batched"]

        def llm_query(prompt: str) -> str:
            """Query the LLM with a prompt string."""
            return _labelled("llm_query", query)(prompt)

        def llm_query_batched(prompts: list[str]) -> list[str]:
            """Query prompts concurrently; one answer per prompt, in order."""
            with observer.fan_out(len(prompts)):
                return _labelled("llm_query_batched", batched)(prompts)

        return {"llm_query": llm_query, "llm_query_batched": llm_query_batched}

    def _setup_facade(self, repl: Any, budget: Any, interpreter_factory: Callable[[], Any]) -> str:
        """dspy's sandbox facade (its sub-agents), on the same observed call budget as llm_query, its host
        tools labelling each call with the sub-agent's kind (`dspy.Predict`, ...)."""
        if self.observer is None:
            return super()._setup_facade(repl, budget, interpreter_factory)
        rules = super()._setup_facade(repl, _ObservedBudget(budget, self.observer), interpreter_factory)
        construct, call = repl.tools.get(CONSTRUCT_TOOL), repl.tools.get(CALL_TOOL)
        if construct is None or call is None:  # the runtime could not host the facade: no sub-agents
            return rules
        kinds: dict[str, str] = {}

        @functools.wraps(construct)
        def construct_labelled(kind: str, signature: Any, attr_name: str, kwargs: Any = None) -> str:
            handle = construct(kind, signature, attr_name, kwargs)
            kinds[handle] = f"dspy.{kind}"
            return handle

        @functools.wraps(call)
        def call_labelled(handle: str, inputs: Any = None) -> Any:
            return _labelled(kinds.get(handle, "dspy"), call)(handle, inputs)

        # The shim calls its host tools by name, so they are re-registered with the next cell.
        repl.tools.update({CONSTRUCT_TOOL: construct_labelled, CALL_TOOL: call_labelled})
        return rules

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

    def _execute_iteration(self, repl: Any, variables: Any, history: Any, iteration: int, input_args: Any,
                           output_field_names: Any, interpreter_factory: Any, sub_agent_rules: str) -> Any:
        """dspy's iteration (ask for an action, run its code), with every reply shape turned into either a
        cell that runs or an observation for the model (see the module's docstring)."""
        if self.observer is not None:
            self.observer.before_iteration(iteration)
        started = time.perf_counter()
        try:
            with dspy.context(adapter=self.adapter):
                action = self.generate_action(
                    signature=self._action_signature_for_current_factory(interpreter_factory, sub_agent_rules),
                    variables_info=[variable.format() for variable in variables], repl_history=history,
                    iteration=f"{iteration + 1}/{self.max_iters}")
            result = self._act(repl, action, history, input_args, output_field_names)
        except AdapterParseError as exc:
            detail = f"the reply was: {clip(exc.lm_response or '', 300)!r}"
            result = history.append(reasoning="", code="", output=prompts.load("no_code").format(detail=detail))
        if self.observer is not None:
            steps = result.trajectory if isinstance(result, dspy.Prediction) else [e.model_dump() for e in result]
            self.observer.after_iteration(iteration, steps[-1], time.perf_counter() - started)
        return result

    def _act(self, repl: Any, action: Any, history: Any, input_args: Any, output_field_names: Any) -> Any:
        reasoning, code = getattr(action, "reasoning", None) or "", getattr(action, "code", None)
        lm = dspy.settings.lm
        if isinstance(lm, RemembersCalls) and lm.last_call().get("finish_reason") == "length":
            note = (f"[Error] Your reply was cut at the token limit (model.max_tokens={self.spec.max_tokens}, "
                    f"finish_reason=length) before it ended, so none of it ran. Reply again with shorter code.")
            return history.append(reasoning=reasoning, code="", output=note)
        if not isinstance(code, str) or not code.strip():
            detail = "the code field was None" if code is None else "the code field was empty"
            return history.append(reasoning=reasoning, code="", output=prompts.load("no_code").format(detail=detail))
        code, notes = replies.cell(code, reasoning, self.spec.early_final)
        if not code.strip():
            return history.append(reasoning=reasoning, code="", output="\n\n".join(notes))
        try:
            code = _strip_code_fences(code)  # dspy's own rule for one fenced cell
        except SyntaxError as exc:
            return history.append(reasoning=reasoning, code=code, output=f"[Error] {exc}")
        result = self._execute_code(repl, code, input_args)
        if notes and not isinstance(result, FinalOutput):
            result = "\n".join(map(str, result)) if isinstance(result, list) else str(result or "")
            result = "\n\n".join([result, *notes]) if result else "\n\n".join(notes)
        return self._process_execution_result(action, code, result, history, output_field_names)


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
                                response=_first(call.get("outputs")),
                                reasoning=_joined(_hidden(call.get("outputs")), step.get("reasoning", "")),
                                code=step.get("code", ""), stdout=output, stderr=None,
                                error=output if failed else None, duration_s=round(duration_s, 3),
                                usage=delta.as_tree(),
                                **({"origin": call["origin"]} if call.get("origin", "live") != "live" else {}))
        self.progress.iteration(self.tree.run["task"], index + 1, self.max_iters, duration_s, usage,
                                "error" if failed else "ok")

    def before_sub_calls(self, count: int) -> None:
        from rlm_pipelines.budget import BudgetExceeded

        try:
            self.budget.check()
        except BudgetExceeded as exc:
            self.refused(exc.limit, count, str(exc))
            raise RuntimeError(f"no more model calls ({api_label()}): {exc}") from None

    def refused(self, limit: str, count: int, message: str) -> None:
        """Refused calls are counted on the agent (the run ends `partial`: its answer may lack them)."""
        for _ in range(count):
            self.tree.refuse(self.agent_id, api_label(), limit, message)

    # the sub-model's CallHook: every call the sandbox makes, whatever API it came through

    def before_call(self) -> None:
        self.before_sub_calls(1)

    def after_call(self, messages: list[dict[str, Any]], answer: Optional[str], record: CallRecord) -> None:
        usage = Usage(record.prompt_tokens, record.completion_tokens, record.cost_usd, 1).as_tree()
        self.tree.add_llm_call(self.agent_id, _prompt(messages), answer, usage=usage, api=api_label(),
                               model=record.model, error=None if record.ok else record.error or "failed",
                               **({"origin": record.origin} if record.origin != "live" else {}))

    def fan_out(self, total: int) -> Any:
        return self.progress.fan_out(f"llm_query_batched x {total}", total)


class _ObservedBudget:
    """dspy's per-run call budget (`limits.max_llm_calls`), which every sandbox model call reserves before it
    is made, with the run's own budget checked first and dspy's refusals counted on the agent."""

    def __init__(self, budget: Any, observer: Observer):
        self.budget, self.observer = budget, observer

    def reserve(self, n: int = 1) -> None:
        self.observer.before_sub_calls(n)
        try:
            self.budget.reserve(n)
        except RuntimeError as exc:
            self.observer.refused("max_llm_calls", n, str(exc))
            raise RuntimeError(f"{exc} (limits.max_llm_calls)") from None


def _labelled(api: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, its model calls labelled with the sandbox API they came through."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _api.set(api)
        try:
            return function(*args, **kwargs)
        finally:
            _api.reset(token)

    return run


def _prompt(messages: list[dict[str, Any]]) -> str:
    """A call's prompt as the run tree shows it: a lone user message as it is, a chat with its roles."""
    if len(messages) == 1 and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str):
        return messages[0]["content"]
    return _render(messages) or ""


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


def _hidden(outputs: Any) -> str:
    """The provider's reasoning field of a reply's first output (recorded, never run)."""
    first = outputs[0] if isinstance(outputs, list) and outputs else None
    return str(first.get("reasoning_content") or "") if isinstance(first, dict) else ""


def _joined(*texts: str) -> str:
    return "\n\n".join(text for text in texts if text)


def _first(outputs: Any) -> Optional[str]:
    if isinstance(outputs, list) and outputs:
        first = outputs[0]
        return first.get("text") if isinstance(first, dict) else str(first)
    return None
