"""The repo engine (`RepoEngine`): recursive agents on a git checkout, each in its own sandbox with its own
fresh checkout.

An agent iterates: prompt (system prompt by depth, its task, a bounded history of code and output) ->
model -> code blocks -> REPL -> record, until FINAL / FINAL_VAR. `rlm_query` / `rlm_query_batched` in its
REPL run child agents (the batch in parallel), whose findings come back as strings.

Limits that hold for the whole tree: `max_depth` (at the limit rlm_query tells the model instead of
spawning), `max_sandboxes` (a slot is reserved before a sandbox is made and freed if making it fails),
`max_iterations` per agent, tokens / dollars / wall time shared by all agents (children get what remains),
and the wall-time deadline applies inside cells, model calls and children alike.
"""

from __future__ import annotations

import contextvars
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.engines import checkout, prompts, replies
from rlm_pipelines.engines.base import EngineResult
from rlm_pipelines.models import LLMClient, ModelError, Usage
from rlm_pipelines.models.callstore import agent_path, agent_scope
from rlm_pipelines.sandbox import (REPO_DIR, DownloadTooLarge, SandboxStartError, SupportsClone, SupportsHostView,
                                   SupportsSeed, can_fork, make_sandbox)
from rlm_pipelines.tasks import RepoTask
from rlm_pipelines.text import clip

HELPERS = (Path(__file__).parent / "sandbox_helpers.py").read_text(encoding="utf-8")


class Cancelled(Exception):
    """The run was stopped (Ctrl-C or another agent hit a run-wide limit)."""


@dataclass
class AgentResult:
    text: str
    status: str
    truncated: bool = False
    patch: bytes = b""
    patch_note: Optional[str] = None  # why the root's patch was dropped


class RepoRun:
    """Everything the agents of one run share: model, tree, budget, sandbox slots, the stop signal."""

    def __init__(self, cfg: Any, tree: Any, budget: Any, progress: Any, mirror: Path, commit: str, url: str):
        """`mirror`: the host's mirror of the repo; `url`: where remote sandboxes clone it from."""
        self.cfg, self.tree, self.budget, self.progress = cfg, tree, budget, progress
        self.limits = cfg.limits
        self.mirror, self.commit, self.url = mirror, commit, url
        self.llm = LLMClient(cfg.model, budget.ledger)
        self.deadline = budget.deadline  # one deadline for the whole run, from when it opened
        self.stop = threading.Event()
        self.stop_reason: Optional[BudgetExceeded] = None
        self._created = 0  # sandboxes made over the run's lifetime (limits.max_sandboxes bounds it)
        self._running = 0  # agents holding a sandbox right now
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._live: set[Any] = set()
        self._base: Optional[Path] = None  # the checkout sub-agents' checkouts are hardlinked from
        self._template: Any = None  # the prepared sandbox sub-agents' sandboxes are forked from
        self._bundle: Optional[Path] = None  # the repo as one file, for sandboxes that get it uploaded
        self._template_lock = threading.Lock()
        self.wrap_agent: Callable[[Callable[..., AgentResult]], Callable[..., AgentResult]] = lambda f: f
        self.paths: dict[str, str] = {}  # agent node id -> its name in calls.jsonl (callstore.agent_path)

    # -- shared limits

    def check(self) -> None:
        """Raise when the run must end: stopped elsewhere, or a run-wide budget is spent."""
        if self.stop.is_set():
            raise self.stop_reason or Cancelled("the run was stopped")
        try:
            self.budget.check()
        except BudgetExceeded as exc:
            self.halt(exc)
            raise

    def halt(self, reason: Optional[BudgetExceeded] = None) -> None:
        """Stop every agent: interrupt running cells; the agents then end and free their sandboxes."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
            live = list(self._live)
        self.stop.set()
        for session in live:
            try:
                session.interrupt()
            except OSError:
                pass

    def _reserve_slot(self) -> bool:
        """Reserve one of the run's sandboxes before making it (atomic, so parallel spawns never overshoot)."""
        with self._lock:
            if self._created >= self.limits.max_sandboxes:
                return False
            self._created += 1
            self._running += 1
            return True

    def _release_slot(self, made: bool) -> None:
        """The agent is done with its sandbox; a sandbox that was never made gives its slot back."""
        with self._idle:
            self._running -= 1
            if not made:
                self._created -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        """After halt(): wait until every agent has stopped its sandbox."""
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=timeout)

    def base(self) -> Path:
        with self._lock:
            if self._base is None:
                self._base = checkout.make_base(self.mirror, self.commit, self.cfg.sandbox.root_dir)
            return self._base

    def bundle(self) -> Path:
        with self._lock:
            if self._bundle is None:
                self._bundle = checkout.make_bundle(self.mirror, self.cfg.sandbox.root_dir)
            return self._bundle

    def template(self) -> Any:
        """A sandbox with a fresh checkout that no agent uses, made once: sub-agents get forks of it (see
        `sandbox.fork_subagents`) instead of a new sandbox that checks the repo out again. None when the
        sandbox budget has no room for it (then agents make their own)."""
        with self._template_lock:
            if self._template is None:
                if not self._reserve_slot():
                    return None
                sandbox = make_sandbox(self.cfg.sandbox, name="template")
                try:
                    sandbox.start()
                    self.tree.count("sandboxes")
                    self._checkout(sandbox, 0)
                except BaseException:
                    sandbox.stop()
                    raise
                finally:
                    self._release_slot(True)  # it holds no agent slot, only its share of the budget
                self._template = sandbox
            return self._template

    def cleanup(self) -> None:
        for made in (self._base, self._bundle):
            if made is not None:
                shutil.rmtree(made.parent, ignore_errors=True)
        if self._template is not None:
            self._template.stop()

    def _checkout(self, sandbox: Any, depth: int) -> None:
        if isinstance(sandbox, SupportsClone):  # a remote sandbox cannot see the mirror: it clones the repo itself
            sandbox.clone(self.url, REPO_DIR, commit=self.commit, bundle=self.bundle)
            return
        if depth > 0 and isinstance(sandbox, SupportsSeed) and sandbox.seed(self.base(), REPO_DIR):
            return
        code, out = sandbox.run(checkout.checkout_command(self.commit), timeout=600)
        if code != 0:
            raise SandboxStartError(f"checkout of {self.commit[:12]} failed in the sandbox: {out.strip()[-500:]}")

    # -- agents

    def spawn(self, task: str, parent_id: Optional[str], depth: int) -> AgentResult:
        with self._lock:
            spent = self._created >= self.limits.max_sandboxes
        if spent and parent_id is not None:  # refused cheaply: no task run, no node beyond a sample
            return self._refuse(task, parent_id)
        return self.wrap_agent(self.run_agent)(task, parent_id, depth)

    def _refuse(self, task: str, parent_id: str) -> AgentResult:
        message = (f"[sub-agent not started: the run's sandbox budget limits.max_sandboxes="
                   f"{self.limits.max_sandboxes} is spent; do this part yourself]")
        self.tree.refuse(parent_id, task, "max_sandboxes", message)
        return AgentResult(message, "budget_exceeded")

    def run_agent(self, task: str, parent_id: Optional[str], depth: int) -> AgentResult:
        if parent_id is not None and not self._reserve_slot():
            return self._refuse(task, parent_id)
        agent = self.tree.add_node("agent", task, parent_id)
        with self._lock:  # the agent's stable name in calls.jsonl (node ids follow spawn order, which varies)
            self.paths[agent] = agent_path(self.paths.get(parent_id or "", "") if parent_id else "agent", task)
        if parent_id is None and not self._reserve_slot():
            message = (f"[not started: the run's sandbox budget limits.max_sandboxes="
                       f"{self.limits.max_sandboxes} is spent]")
            self.tree.end_node(agent, "budget_exceeded", result=message, error="max_sandboxes reached")
            return AgentResult(message, "budget_exceeded")
        sandbox, made = None, False
        try:
            template = self.template() if depth > 0 and can_fork(self.cfg.sandbox) else None
            if template is not None:
                sandbox = template.fork(f"agent-{agent}")
            else:
                mounts = {str(self.mirror): checkout.MIRROR_IN_SANDBOX}
                sandbox = make_sandbox(self.cfg.sandbox, name=f"agent-{agent}", mounts=mounts)
                sandbox.start()
            made = True
            self.tree.update_node(agent, sandbox_id=sandbox.id)
            self.tree.count("sandboxes")
            if template is None:
                self._checkout(sandbox, depth)
            return Agent(self, agent, task, depth, sandbox).run()
        except Cancelled as exc:
            self.tree.end_node(agent, "cancelled", error=str(exc))
            raise
        except BudgetExceeded as exc:
            self.tree.end_node(agent, exc.status, error=str(exc))
            raise
        except BaseException as exc:
            self.tree.end_node(agent, "cancelled" if isinstance(exc, KeyboardInterrupt) else "error",
                               error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if sandbox is not None:
                sandbox.stop()
            self._release_slot(made)


class Agent:
    def __init__(self, run: RepoRun, node_id: str, task: str, depth: int, sandbox: Any):
        self.shared, self.node_id, self.task, self.depth, self.sandbox = run, node_id, task, depth, sandbox
        self.limits = run.limits

    def _tools(self) -> dict[str, Callable[..., Any]]:
        run, depth, limit = self.shared, self.depth, self.limits.result_truncation_limit

        def rlm_query(task: str) -> str:
            """Run a sub-agent on `task` in its own sandbox and checkout; returns its findings."""
            if depth + 1 > run.limits.max_depth:
                message = (f"[rlm_query refused: the depth limit limits.max_depth={run.limits.max_depth} is "
                           f"reached; do this part yourself]")
                run.tree.refuse(self.node_id, task, "max_depth", message)
                return message
            try:
                result = run.spawn(task, self.node_id, depth + 1)
            except (Cancelled, BudgetExceeded) as exc:
                return f"[sub-agent stopped: {exc}]"
            except Exception as exc:
                return f"[sub-agent failed: {type(exc).__name__}: {exc}]"
            return clip(result.text, limit)

        def rlm_query_batched(tasks: list[str]) -> list[str]:
            """Run one sub-agent per task, in parallel; returns their findings in order."""
            if not tasks:
                return []
            with ThreadPoolExecutor(min(len(tasks), run.limits.concurrency)) as pool:
                futures = [pool.submit(contextvars.copy_context().run, rlm_query, t) for t in tasks]
                return [f.result() for f in futures]

        return {"rlm_query": rlm_query, "rlm_query_batched": rlm_query_batched}

    def run(self) -> AgentResult:
        with agent_scope(self.shared.paths[self.node_id]):
            return self._run()

    def _run(self) -> AgentResult:
        run, limits = self.shared, self.limits
        session = self.sandbox.open_repl()
        with run._lock:
            run._live.add(session)
        try:
            session.register(self._tools(), final=True)
            session.set_vars({"task": self.task, "depth": self.depth, "REPO": REPO_DIR})
            session.execute(HELPERS)
            system = prompts.load("repo_system").format(
                depth=self.depth, max_depth=limits.max_depth, cell_timeout=f"{run.cfg.sandbox.repl.cell_timeout_s:g}",
                spawn_note=("" if self.depth < limits.max_depth else
                        "(You are at the depth limit: rlm_query will refuse; do the work yourself.)")
            + ("" if self.depth == 0 else " Your checkout's files are shared read-only with other agents: to "
               "change one, replace it (edit_file does), do not write into it."))
            if run.cfg.model.extra_instructions:
                system += "\n\n" + run.cfg.model.extra_instructions.strip()
            history: list[dict[str, str]] = []
            observation = f"Your task:\n{self.task}"  # each observation is headed [iteration N/M]
            for index in range(limits.max_iterations):
                run.check()
                final, observation = self._iterate(session, system, history, observation, index)
                if final is not None:
                    return self._finish(final)
            message = f"[no FINAL after limits.max_iterations={limits.max_iterations} iterations]"
            run.tree.end_node(self.node_id, "error", result=message, error="max_iterations reached")
            return AgentResult(message, "error")
        finally:
            with run._lock:
                run._live.discard(session)

    def _iterate(self, session: Any, system: str, history: list[dict[str, str]], observation: str,
                 index: int) -> tuple[Optional[dict[str, Any]], str]:
        run, limits = self.shared, self.limits
        observation = f"[iteration {index + 1}/{limits.max_iterations}]\n{observation}"
        history.append({"role": "user", "content": observation})
        messages = with_system(system, _bounded(history, limits.history_chars), run.cfg.model.system_prompt)
        started = time.perf_counter()
        remaining = run.deadline - time.monotonic()
        try:
            completion = run.llm.complete(messages, timeout=max(1.0, min(run.cfg.model.timeout_s, remaining)),
                                          deadline=run.deadline)
            reply = completion.text
        except ModelError:
            if time.monotonic() >= run.deadline:
                run.check()  # the deadline passed during the call: a timeout, not a model failure
            raise
        history.append({"role": "assistant", "content": reply or "(empty reply)"})  # some APIs refuse ""
        spec = run.cfg.model
        plan = replies.read(reply, completion.reasoning, completion.finish_reason, spec.early_final, spec.max_tokens)
        outputs, final, stdout, stderr, errors = list(plan.notes), None, [], [], []
        if not plan.blocks and plan.final is None and not plan.notes:
            outputs.append(prompts.load("repo_no_code"))
        for block in plan.blocks:
            result = session.execute(block, timeout_s=run.cfg.sandbox.repl.cell_timeout_s, deadline=run.deadline)
            stdout.append(result.stdout)
            stderr.append(result.stderr)
            if result.error is not None:
                errors.append(str(result.error))
            shown = clip(result.output(), limits.max_output_chars, note="the full output is in run.json")
            outputs.append(shown or "(no output)")
            if result.final is not None:
                final = result.final
                break
            if result.error is not None:
                break  # later blocks probably depend on this one
        if final is None and plan.final is not None and not errors:
            final, told = self._said_final(session, *plan.final)
            outputs.extend(told)
        after = run.budget.ledger.snapshot()
        run.tree.add_iteration(self.node_id, prompt=observation, response=reply, code="\n\n".join(plan.blocks),
                               reasoning=plan.reasoning or None, quirks=plan.quirks or None,
                               stdout="".join(stdout), stderr="".join(stderr) or None,
                               error="\n".join(errors) or None, duration_s=round(time.perf_counter() - started, 3),
                               usage=Usage.from_completion(completion).as_tree(),
                               **({"origin": completion.origin} if completion.origin != "live" else {}))
        run.tree.set_usage(Usage.from_snapshot(after).as_tree())
        run.progress.iteration(f"agent {self.node_id} (depth {self.depth})", index + 1, limits.max_iterations,
                               time.perf_counter() - started, after, "error" if errors else "ok")
        heads = [f"Output of block {i + 1}:\n{o}" for i, o in enumerate(outputs[len(plan.notes):])]
        return final, "\n\n".join([*outputs[:len(plan.notes)], *heads])

    def _said_final(self, session: Any, kind: str, argument: str) -> tuple[Optional[dict[str, Any]], list[str]]:
        """A FINAL / FINAL_VAR the model wrote outside code (see `replies`): (the final, what to tell)."""
        if kind == "FINAL":
            return {"value": replies.final_text(argument)}, []
        name = replies.variable_name(argument)
        result = session.execute(f"FINAL_VAR({name!r})", timeout_s=30, deadline=self.shared.deadline)
        if result.final is not None:
            return result.final, []
        return None, [f"[FINAL_VAR({argument}) in your reply was not taken: {result.error}]"]

    def _finish(self, final: dict[str, Any]) -> AgentResult:
        value = final.get("value")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
        patch, note = self._patch() if self.depth == 0 else (b"", None)
        if note is not None:
            self.shared.tree.update_node(self.node_id, patch_note=note)
        limit = self.limits.result_truncation_limit
        truncated = self.depth > 0 and len(text) > limit
        self.shared.tree.end_node(self.node_id, "ok", result=text, result_truncated=truncated)
        return AgentResult(text, "ok", truncated, patch, note)

    def _patch(self) -> tuple[bytes, Optional[str]]:
        """The root's changes, new files included, as a binary-safe diff of at most limits.max_patch_mb, and
        None; or b"" and why it was dropped. Where the host can see the checkout, the sandbox's processes are
        stopped first and the diff is made on the host, so nothing in the sandbox can race it; elsewhere it is
        made inside and downloaded bounded (regular file, size cap, the run's deadline)."""
        run, cap = self.shared, self.limits.max_patch_mb << 20
        try:
            if isinstance(self.sandbox, SupportsHostView):
                work = self.sandbox.host_view(REPO_DIR)
                return checkout.host_patch(run.mirror, work, run.commit, cap, run.deadline,
                                           run.cfg.sandbox.root_dir or None), None
            left = max(1.0, min(120.0, run.deadline - time.monotonic()))
            code, out = self.sandbox.run(f"cd {REPO_DIR} && git add -A && git diff --cached --binary {run.commit} "
                                         f"> /tmp/rlm.patch", timeout=left)
            if code != 0:
                raise RuntimeError(f"could not make the patch: {out.strip()[-500:]}")
            return self.sandbox.download("/tmp/rlm.patch", max_bytes=cap, deadline=run.deadline), None
        except DownloadTooLarge:
            note = f"the patch was over limits.max_patch_mb={self.limits.max_patch_mb} and was dropped"
        except (TimeoutError, subprocess.TimeoutExpired):
            note = "making the patch ran past limits.wall_time_s and it was dropped"
        print(f"warning: {note}", file=sys.stderr)
        return b"", note


def with_system(system: str, messages: list[dict[str, str]], supported: bool = True) -> list[dict[str, str]]:
    """The chat with its system prompt: as a system message, or (`model.system_prompt: false`, for models
    that take no system role) at the head of the first user message."""
    if supported:
        return [{"role": "system", "content": system}, *messages]
    first, rest = messages[0], messages[1:]
    return [{**first, "content": f"{system}\n\n{first['content']}"}, *rest]


def _bounded(history: list[dict[str, str]], budget_chars: int) -> list[dict[str, str]]:
    """The first message (the task) and as many of the latest turns as fit, so a long run never overflows the
    model's context; a note says what was left out. Roles keep alternating user / assistant."""
    first, rest = history[0], history[1:]
    kept: list[dict[str, str]] = []
    used = len(first["content"])
    for message in reversed(rest):
        used += len(message["content"])
        if used > budget_chars and len(kept) >= 2:
            break
        kept.append(message)
    kept.reverse()
    if len(kept) == len(rest):
        return [first, *kept]
    if kept and kept[0]["role"] == "user":
        kept = kept[1:]  # after the first (user) message comes an assistant one
    note = (f"\n\n[{len(rest) - len(kept)} earlier messages omitted to keep the context bounded; what their "
            f"code did still holds in the REPL]")
    return [{**first, "content": first["content"] + note}, *kept]


class RepoEngine:
    """Repo tasks: recursive agents on a checkout of the task's repo at one commit; the root's changes are
    the patch, checked on a fresh checkout (`conf/engine/repo.yaml`)."""

    name = "repo"
    task_type = RepoTask

    def __init__(self, config: Any = None):
        self.config = config

    def prepare(self, run: Any) -> dict[str, Any]:
        return {"repo": run.params.repo}  # the repo itself is the input: agents check it out themselves

    def run(self, run: Any) -> EngineResult:
        task, params, tree = run.task, run.params, run.tree
        mirror, commit = checkout.prepare_mirror(params.repo, params.branch, params.commit)
        tree.run.update(repo=params.repo, branch=params.branch, commit=commit)
        repo_run = RepoRun(run.cfg, tree, run.budget, run.progress, mirror, commit,
                           checkout.clone_url(params.repo, mirror))
        repo_run.llm.calls = run.calls
        if run.wrap_agent is not None:
            repo_run.wrap_agent = run.wrap_agent
        try:
            root = repo_run.spawn(task.prompt(params), None, 0)
        except BaseException as exc:
            repo_run.halt(exc if isinstance(exc, BudgetExceeded) else None)
            repo_run.wait_idle(timeout=30)  # children stop and free their sandboxes before the run reports
            raise
        finally:
            repo_run.cleanup()
        if repo_run.stop_reason is not None:
            raise repo_run.stop_reason
        if root.status != "ok":
            raise RuntimeError(f"the root agent ended without an answer: {root.text}")
        result = EngineResult(task.parse_result(root.text, params), root.patch)
        if root.patch_note:
            tree.run["patch"] = {"bytes": 0, "applies": None, "dropped": root.patch_note}
        if root.patch:
            result.patch_applies, message = checkout.patch_applies(mirror, commit, root.patch)
            tree.run["patch"] = {"bytes": len(root.patch), "applies": result.patch_applies, "check": message}
            if params.patch_out and result.patch_applies:
                out = Path(params.patch_out).expanduser()
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(root.patch)
        return result
