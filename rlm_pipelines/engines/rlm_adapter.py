"""dspy's chat adapter with real models' quirks, for the document engine's own turns (`SandboxRLM` uses it
for its `reasoning` + `code` action; sub-agents keep dspy's default). Imports dspy: loaded with rlm.py.

- One reply, one call: no JSON-adapter retry (dspy's default fallback asks the model again, unrecorded as a
  turn); a reply that still cannot be read becomes an observation (`SandboxRLM`).
- `<think>...</think>` is removed before the fields are read (the reply as received stays in the record).
- Lenient reading, only when dspy's own parse fails: `[[ ## Field ## ]]` headers matched case-blind, common
  renames (`python`, `code_block` -> code; `thought`, `thinking`, `rationale` -> reasoning), a missing
  reasoning read as empty, and a reply with no headers but a fenced Python block read as that code.
- Per-model prompt settings (`ModelSpec`): `extra_instructions` added to the system message, and
  `system_prompt: false` puts the system message at the head of the first user message.
"""

from __future__ import annotations

import re
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from rlm_pipelines.engines.replies import THINK

HEADER = re.compile(r"\[\[\s*##\s*(\w+)\s*##\s*\]\]", re.IGNORECASE)
ALIASES = {"python": "code", "code_block": "code", "thought": "reasoning", "thinking": "reasoning",
           "thoughts": "reasoning", "rationale": "reasoning"}
FENCED = re.compile(r"```[ \t]*(?:python|py|python3|repl)?[ \t]*\n.*?```", re.DOTALL | re.IGNORECASE)


class QuirksAdapter(dspy.ChatAdapter):
    def __init__(self, extra_instructions: str = "", system_prompt: bool = True):
        super().__init__(use_json_adapter_fallback=False)
        self.extra_instructions, self.system_prompt = extra_instructions.strip(), system_prompt

    def format(self, signature: Any, demos: Any, inputs: Any) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        if not messages or messages[0].get("role") != "system":
            return messages
        system = messages[0]["content"]
        if self.extra_instructions:
            system = f"{system}\n\n{self.extra_instructions}"
        if self.system_prompt or len(messages) < 2 or not isinstance(messages[1].get("content"), str):
            return [{**messages[0], "content": system}, *messages[1:]]
        return [{**messages[1], "content": f"{system}\n\n{messages[1]['content']}"}, *messages[2:]]

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        completion = THINK.sub("", completion or "")  # thinking is kept in the record, never read as fields
        try:
            return super().parse(signature, completion)
        except AdapterParseError:
            found = lenient(signature, completion or "")
            if found is None:
                raise
            return found


def lenient(signature: Any, text: str) -> dict[str, Any] | None:
    """The action's fields read leniently from `text` (see the module's docstring), or None."""
    wanted = set(signature.output_fields)
    if not {"reasoning", "code"} >= wanted or "code" not in wanted:
        return None  # only the RLM's own action is read leniently
    parts = HEADER.split(text)
    sections: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        key = ALIASES.get(name.lower(), name.lower())
        sections.setdefault(key, body.strip())
    if sections.get("code"):
        return {name: sections.get(name, "") for name in wanted}
    if len(parts) == 1 and FENCED.search(text):
        blocks = FENCED.findall(text)
        prose = FENCED.sub("", text).strip()
        return {"reasoning": prose, "code": "\n".join(blocks)} if "reasoning" in wanted else {"code": "\n".join(blocks)}
    return None
