"""`scripted`: an offline, deterministic model provider registered with litellm.

It replays a script a task ships: the code an RLM would write for that task (root turns) and
deterministic answers to its sub-calls. So `litellm.completion(model="scripted/<name>")` and
`dspy.LM("scripted/<name>", engine="litellm")` work with no key and no network, and the whole system can
be tried and tested offline. Every response says `model: scripted`.

Root or sub: the model string tells. `scripted/<name>` is the root model (RLM action calls);
`scripted/<name>.sub` answers `llm_query` prompts.

The turn index comes from the prompt itself, never from hidden state, so concurrent runs of one script do
not interfere: dspy's RLM prompt carries `[[ ## iteration ## ]] N/M`; a plain chat (the repo engine) counts
its assistant messages.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

SUB_SUFFIX = ".sub"
_ITERATION = re.compile(r"\[\[ ## iteration ## \]\]\s*(\d+)\s*/")
_REPO_ITERATION = re.compile(r"\[iteration (\d+)/\d+\]")


@dataclass
class Turn:
    code: str
    reasoning: str = ""


class Script(Protocol):
    def root(self, index: int, messages: list[dict[str, Any]]) -> Turn:
        """The root model's turn number `index` (0-based)."""
        ...

    def sub(self, prompt: str) -> str:
        """The answer to one `llm_query` prompt."""
        ...


class TurnScript:
    """A fixed list of root turns and a function answering sub-calls."""

    def __init__(self, turns: list[Turn], sub_answer: Optional[Callable[[str], str]] = None):
        self.turns = turns
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
    _scripts[name] = script


def reply(model: str, messages: list[dict[str, Any]]) -> str:
    """The scripted model's reply text to a chat."""
    name = model.split("/", 1)[1] if "/" in model else model
    is_sub = name.endswith(SUB_SUFFIX)
    name = name[: -len(SUB_SUFFIX)] if is_sub else name
    script = _scripts.get(name)
    if script is None:
        known = ", ".join(sorted(_scripts)) or "none registered"
        raise ValueError(f"no scripted model named {name!r} (known: {known}); tasks register theirs")
    text = "\n".join(_content(m) for m in messages)
    if is_sub:
        return script.sub(_content(messages[-1]) if messages else "")
    found = _ITERATION.findall(text)
    if found:  # dspy's RLM prompt (ChatAdapter format): answer in its field markers
        turn = script.root(int(found[-1]) - 1, messages)
        return (f"[[ ## reasoning ## ]]\n{turn.reasoning or 'Scripted step.'}\n\n"
                f"[[ ## code ## ]]\n```python\n{turn.code}\n```\n\n[[ ## completed ## ]]")
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
        from litellm import CustomLLM, ModelResponse

        litellm.suppress_debug_info = True  # no "Provider List" banners on the console

        class ScriptedLLM(CustomLLM):
            def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
                model, messages = kwargs.get("model", ""), kwargs.get("messages") or []
                text = reply(model, messages)
                prompt_tokens = sum(len(_content(m)) for m in messages) // 4
                return ModelResponse(
                    model="scripted",
                    choices=[{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}],
                    usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                           "total_tokens": prompt_tokens + len(text) // 4},
                )

            async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
                return self.completion(*args, **kwargs)

        handler = ScriptedLLM()
        litellm.custom_provider_map = [p for p in litellm.custom_provider_map if p.get("provider") != "scripted"]
        litellm.custom_provider_map.append({"provider": "scripted", "custom_handler": handler})
        _installed = True
