"""How the repo engine reads a model's reply: what runs, what is only recorded, and what the model is told.
Real models reply in many shapes; each shape has one policy here (README, "Model replies"):

- Thinking: `<think>...</think>` (an unclosed `<think>` runs to the end) is removed before code is looked
  for, and a provider's reasoning field is never run; both are kept in the record (iteration `reasoning`).
- Code: fenced blocks tagged `python`, `py`, `python3`, `repl`, or untagged (bare ```); other languages
  (```bash, ```json, ```text) are not run. Prose around the blocks is ignored. Every block runs, in order,
  in the one REPL; an error stops the rest of the reply (later blocks probably depend on it).
- A reply cut at `model.max_tokens` (finish_reason `length`): nothing in it runs (half a block would run
  half a plan); the model is told, and asked for a shorter reply.
- No text (only hidden reasoning tokens), or text with no code: nothing runs and the model is told; a
  `FINAL(...)` / `FINAL_VAR(...)` starting a line of prose, in a reply with no code, is the answer (FINAL's argument as written, a
  quoted string unquoted; FINAL_VAR's variable looked up in the REPL).
- A FINAL written before the model saw the output of code in the same reply (starting a line of prose next
  to code, or in a block after another block), per `model.early_final`: `confirm` (the default) runs the code, not the
  final (a block holding the final is not run), and tells the model so, asking it to call FINAL again if
  the answer still stands; `accept` runs every block and takes a prose FINAL once the code ran cleanly.
  A FINAL inside the one block of a reply is not early: it runs after the code before it, in that cell.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Optional

EARLY_FINAL_POLICIES = ("confirm", "accept")
CODE_TAGS = {"", "python", "py", "python3", "repl"}
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
THINK = re.compile(r"<think(?:ing)?>(.*?)(?:</think(?:ing)?>|\Z)", re.DOTALL | re.IGNORECASE)
FINAL_CALL = re.compile(r"\bFINAL(_VAR)?\s*\(")
PROSE_FINAL = re.compile(r"^[ \t>*_`]*FINAL(_VAR)?\s*\(", re.MULTILINE)  # at the start of a line, as others read it


@dataclass
class Plan:
    """What to do with one reply: run `blocks` in order, then take `final` (("FINAL" | "FINAL_VAR", argument))
    if no block errored and no block ended the agent. `notes` go to the model before the blocks' outputs."""

    blocks: list[str] = field(default_factory=list)
    final: Optional[tuple[str, str]] = None
    notes: list[str] = field(default_factory=list)
    reasoning: str = ""
    quirks: list[str] = field(default_factory=list)  # what was unusual about the reply, for the record


def read(text: str, reasoning: str = "", finish_reason: str = "stop", early_final: str = "confirm",
         max_tokens: int = 0) -> Plan:
    """The plan for one reply (`reasoning`: the provider's reasoning field, if any)."""
    thoughts = [m.strip() for m in THINK.findall(text or "")]
    visible = THINK.sub("", text or "").strip()
    plan = Plan(reasoning="\n\n".join(t for t in [reasoning.strip(), *thoughts] if t))
    if thoughts:
        plan.quirks.append("think_tags")
    if finish_reason == "length":
        plan.quirks.append("cut")
        plan.notes.append(f"[Your reply was cut at the token limit (model.max_tokens={max_tokens}, "
                          f"finish_reason=length) before it ended, so none of it ran. Reply again with shorter "
                          f"code (split the work over several replies) and less prose.]")
        return plan
    if not visible:
        plan.quirks.append("empty")
        hidden = " (only hidden reasoning)" if plan.reasoning else ""
        plan.notes.append(f"[Your reply had no text{hidden}, so nothing ran. Reply with Python code in a "
                          f"```python block; when you are done, call FINAL(answer) or FINAL_VAR(name) in it.]")
        return plan
    blocks = [(tag.lower(), body.strip()) for tag, body in FENCE.findall(visible)]
    code = [body for tag, body in blocks if tag in CODE_TAGS and body]
    prose = FENCE.sub("", visible)
    said = _prose_final(prose)
    if not code:
        if said is not None:
            plan.final = said
            plan.quirks.append("final_in_prose")
        return plan  # the engine tells a reply with no code and no FINAL to write code
    if len(code) > 1:
        plan.quirks.append("several_blocks")
    late = next((i for i, body in enumerate(code) if i > 0 and FINAL_CALL.search(body)), None)
    if early_final == "accept":
        plan.blocks, plan.final = code, said
        if said is not None or late is not None:
            plan.quirks.append("early_final_accepted")
        return plan
    plan.blocks = code if late is None else code[:late]
    if said is not None or late is not None:
        plan.quirks.append("early_final_held")
        where = "in prose next to your code" if late is None else f"in code block {late + 1}, after other code"
        plan.notes.append(f"[Your reply gave a final answer ({where}) before you had seen what the code "
                          f"printed, so it was not taken{'' if late is None else ' and that block did not run'}"
                          f" (model.early_final=confirm). Look at the output below; if the answer still "
                          f"stands, call FINAL(...) or FINAL_VAR(...) in your next code block.]")
    return plan


def _prose_final(prose: str) -> Optional[tuple[str, str]]:
    """("FINAL" | "FINAL_VAR", argument) for the last FINAL that starts a line outside code, or None (a FINAL
    mid-sentence, "I will call FINAL(answer) later", is talk, not an answer)."""
    found = None
    for match in PROSE_FINAL.finditer(prose):
        found = ("FINAL_VAR" if match.group(1) else "FINAL", _balanced(prose[match.end():]))
    return found


def _balanced(text: str) -> str:
    """The argument of a call whose opening bracket is already consumed: text up to the matching `)`."""
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return text[:index].strip()
            depth -= 1
    return text.strip()


def final_text(argument: str) -> str:
    """FINAL's argument as the answer: a quoted string literal unquoted, anything else as written."""
    try:
        value = ast.literal_eval(argument)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return argument
    return value if isinstance(value, str) else argument


def variable_name(argument: str) -> str:
    """FINAL_VAR's argument as a variable name (FINAL_VAR(report) and FINAL_VAR('report') alike)."""
    name = final_text(argument).strip()
    return name if name.isidentifier() else ""


def cell(code: str, reasoning: str = "", early_final: str = "confirm", final: str = "SUBMIT") -> tuple[str, list[str]]:
    """The document engine's `code` field as the cell to run, and notes for the model: think tags out, every
    Python block of a fenced field joined in order (a block after the first that calls `final` waits, with
    `confirm`), and a `final` written in the reasoning, which never runs, told as not taken."""
    code = THINK.sub("", code).strip()
    notes: list[str] = []
    if "```" in code:
        blocks = [body.strip() for tag, body in FENCE.findall(code) if tag.lower() in CODE_TAGS and body.strip()]
        call = re.compile(rf"\b{final}\s*\(")
        late = next((i for i, body in enumerate(blocks) if i > 0 and call.search(body)), None)
        if late is not None and early_final == "confirm":
            blocks = blocks[:late]
            notes.append(f"[Your code's block {late + 1} called {final} after other code whose output you had not "
                         f"seen, so it did not run (model.early_final=confirm). If the answer still stands after "
                         f"the output above, call {final}(...) again.]")
        code = "\n\n".join(blocks) if blocks or late is not None else code
    if re.search(rf"\b{final}\s*\(", reasoning or "") and not re.search(rf"\b{final}\s*\(", code):
        notes.append(f"[Your reasoning wrote {final}(...), but only the code field runs, so no answer was taken. "
                     f"If the answer still stands after the output above, call {final}(...) in the code.]")
    return code, notes
