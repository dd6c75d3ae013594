"""The document engine: a task's inputs, built on the host, go once into one sandbox where `dspy.RLM`
(`rlm.py`: `SandboxRLM` over `interpreter.py`) works through them; the signature's outputs are the result.
This module is cheap to import (dspy is loaded when a run starts), so input checks can ask it what it runs.
"""

from __future__ import annotations

import time
from typing import Any

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.engines.base import EngineResult
from rlm_pipelines.tasks import DocumentTask, check_input_size


class DocumentEngine:
    """Document tasks with dspy.RLM in one sandbox: the host builds the inputs, they cross into the sandbox
    once, and the signature's outputs are the result (`conf/engine/document.yaml`)."""

    name = "document"
    task_type = DocumentTask

    def __init__(self, config: Any = None):
        self.config = config

    def prepare(self, run: Any) -> dict[str, Any]:
        check_input_size(run.task, run.params, run.cfg.limits.max_input_mb)  # also for runs the CLI did not check
        started = time.perf_counter()
        run.inputs = run.task.build_inputs(run.params)
        sizes = {k: (len(v) if isinstance(v, (list, str)) else 1) for k, v in run.inputs.items()}
        run.progress.line(f"inputs ready in {time.perf_counter() - started:.1f} s: {sizes}")
        return sizes

    def run(self, run: Any) -> EngineResult:
        import dspy

        from rlm_pipelines.engines.interpreter import SandboxInterpreterFactory
        from rlm_pipelines.engines.rlm import SandboxRLM, TreeObserver
        from rlm_pipelines.models import build_dspy_lm, sub_spec

        task, cfg, tree, budget = run.task, run.cfg, run.tree, run.budget
        spec, limits = cfg.model, cfg.limits
        root_lm = build_dspy_lm(spec, budget.ledger, role="root", deadline=budget.deadline, calls=run.calls)
        signature = dspy.Signature(task.signature, task.instructions)
        agent = tree.add_node("agent", task.instructions or task.signature)
        observer = TreeObserver(tree, agent, budget, run.progress, root_lm, limits.max_iterations)
        # Everything the sandbox asks of a model (llm_query, dspy's sub-agents) runs on sub_lm: the observer
        # checks the budget before each call and records each one in the run tree.
        sub_lm = build_dspy_lm(sub_spec(spec), budget.ledger, role="sub", deadline=budget.deadline, hook=observer,
                               calls=run.calls)
        sandboxes: list[str] = []

        def started(sandbox_id: str) -> None:
            if not sandboxes:  # the agent's own; a nested dspy.RLM sub-agent's sandboxes are only counted
                tree.update_node(agent, sandbox_id=sandbox_id)
            sandboxes.append(sandbox_id)
            tree.count("sandboxes")

        factory = SandboxInterpreterFactory(cfg.sandbox, on_start=started, deadline=budget.deadline)
        rlm = SandboxRLM(signature, interpreter_factory=factory,
                         batch_concurrency=limits.concurrency, max_iters=limits.max_iterations,
                         max_llm_calls=limits.max_llm_calls, max_output_chars=limits.max_output_chars,
                         sub_lm=sub_lm, observer=observer, spec=spec)
        try:
            with dspy.context(lm=root_lm):
                prediction = rlm(**run.inputs)
        except BudgetExceeded as exc:  # a cell, a model call or the check between iterations met a limit
            tree.end_node(agent, exc.status, error=str(exc))
            raise
        return EngineResult({name: getattr(prediction, name) for name in signature.output_fields})
