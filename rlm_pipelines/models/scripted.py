"""`scripted`: an offline, deterministic model provider registered with litellm.

It replays a script a task ships: the code an RLM would write for that task (root turns) and
deterministic answers to its sub-calls. So `litellm.completion(model="scripted/<name>")` and
`dspy.LM("scripted/<name>", engine="litellm")` work with no key and no network, and the whole system can
be tried and tested offline. Every response says `model: scripted`.

Root or sub: the model string tells, so one script serves both and no call has to be guessed from its
text. `scripted/<name>` is the root model (RLM action calls, repo agent turns); `scripted/<name>.sub`
answers `llm_query` prompts (conf/model/scripted.yaml sets `sub.model` so; `sub_spec` applies it).

The turn index comes from the prompt itself, never from hidden state, so concurrent runs of one script do
not interfere. dspy's RLM passes its action predictor an `iteration` input field ("N/M", 1-based), which
the ChatAdapter renders as `[[ ## iteration ## ]]\nN/M` after the REPL history; the reply then uses the
adapter's field markers (`reasoning`, `code`, `completed`). A plain chat (the repo engine) is answered in
markdown (reasoning, then a ```python block); its index is the `[iteration N/M]` header of the latest
message, else the number of assistant messages so far.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

SUB_SUFFIX = ".sub"
_ITERATION = re.compile(r"\[\[ ## iteration ## \]\]\s*(\d+)\s*/")
_DSPY_FIELD = "[[ ## completed ## ]]"
_REPO_ITERATION = re.compile(r"\[iteration (\d+)/\d+\]")


class ScriptError(ValueError):
    """The scripted model cannot answer this call (unknown script, a prompt it has no reply for)."""


@dataclass
class Turn:
    """One root turn: the code the model writes, and its reasoning (shown before it)."""

    code: str
    reasoning: str = ""


class Script(Protocol):
    """What a task ships for `model=scripted`. It supplies content only: the provider finds the turn index
    in the prompt and formats the reply for the caller (dspy fields or markdown), so one script serves
    both engines."""

    def root(self, index: int, messages: list[dict[str, Any]]) -> Turn:
        """The root model's turn number `index` (0-based)."""
        ...

    def sub(self, prompt: str) -> str:
        """The answer to one `llm_query` prompt."""
        ...


class TurnScript:
    """A fixed list of root turns (a bare string is a turn's code) and a function answering sub-calls."""

    def __init__(self, turns: list[Union[Turn, str]], sub_answer: Optional[Callable[[str], str]] = None):
        self.turns = [Turn(t) if isinstance(t, str) else t for t in turns]
        self.sub_answer = sub_answer or (lambda prompt: f"scripted answer ({len(prompt)} chars read)")

    def root(self, index: int, messages: list[dict[str, Any]]) -> Turn:
        if index < len(self.turns):
            return self.turns[index]
        return Turn(f"raise RuntimeError('the scripted model has no turn {index + 1}: "
                    f"its script has {len(self.turns)}')", "out of script")

    def sub(self, prompt: str) -> str:
        return self.sub_answer(prompt)


class DepthScript(TurnScript):
    """Root turns chosen by the agent's depth in a repo-engine tree (read from its system prompt)."""

    DEPTH = re.compile(r"depth (\d+) of at most")

    def __init__(self, turns_by_depth: dict[int, list[Turn]]):
        super().__init__([])
        self.turns_by_depth = turns_by_depth

    def root(self, index: int, messages: list[dict[str, Any]]) -> Turn:
        found = self.DEPTH.search(_content(messages[0])) if messages else None
        depth = min(int(found.group(1)) if found else 0, max(self.turns_by_depth))
        return TurnScript(self.turns_by_depth[depth]).root(index, messages)


_scripts: dict[str, Script] = {}


def register_script(name: str, script: Script) -> None:
    """Serve `script` as `scripted/<name>` (root) and `scripted/<name>.sub`; a new one replaces the old."""
    _scripts[name] = script


def serve_task_script(model: str, task: str, make_script: Callable[[], Script]) -> None:
    """Before a run: when its model is `scripted/<task>` (what `model=scripted` composes to), serve the
    task's own policy under that name. Whatever the engine, this is the one place a script is registered."""
    if model == f"scripted/{task}":
        register_script(task, make_script())


def reply(model: str, messages: list[dict[str, Any]]) -> str:
    """The scripted model's reply text to a chat."""
    name = model.split("/", 1)[1] if "/" in model else model
    is_sub = name.endswith(SUB_SUFFIX)
    name = name[: -len(SUB_SUFFIX)] if is_sub else name
    script = _scripts.get(name)
    if script is None:
        known = ", ".join(sorted(_scripts)) or "none registered"
        raise ScriptError(f"no scripted model named {name!r} (known: {known}); tasks register theirs")
    if is_sub:
        return script.sub(_content(messages[-1]) if messages else "")
    text = "\n".join(_content(m) for m in messages)
    found = _ITERATION.findall(text)
    if found:  # dspy's RLM prompt (ChatAdapter format): answer in its field markers
        turn = script.root(int(found[-1]) - 1, messages)
        return (f"[[ ## reasoning ## ]]\n{turn.reasoning or 'Scripted step.'}\n\n"
                f"[[ ## code ## ]]\n```python\n{turn.code}\n```\n\n[[ ## completed ## ]]")
    if _DSPY_FIELD in text:  # another dspy program (e.g. RLM's extract step after max_iters): nothing scripted
        raise ScriptError(f"scripted model {name!r} has no reply for a dspy prompt without an RLM iteration "
                         f"field (only RLM action steps and llm_query calls are scripted)")
    found = _REPO_ITERATION.findall(_content(messages[-1])) if messages else []
    index = int(found[-1]) - 1 if found else sum(m.get("role") == "assistant" for m in messages)
    turn = script.root(index, messages)
    return f"{turn.reasoning}\n\n```python\n{turn.code}\n```".strip()


def _content(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Register the provider with litellm (idempotent, cheap after the first call)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        import litellm

        from rlm_pipelines.models.scripted_provider import ScriptedLLM

        litellm.suppress_debug_info = True  # no "Provider List" banners on the console
        handler = ScriptedLLM()
        litellm.custom_provider_map = [p for p in litellm.custom_provider_map if p.get("provider") != "scripted"]
        litellm.custom_provider_map.append({"provider": "scripted", "custom_handler": handler})
        _installed = True
