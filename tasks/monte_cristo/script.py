"""The scripted policy for `model=scripted`: the code an RLM would write for this task, and a sub-model
that answers deterministically from the chapter text itself (no network, no key)."""

from __future__ import annotations

import json
import re

from rlm_pipelines.models.scripted import Turn, TurnScript

RICH = ("fortune", "treasure", "million", "rich", "wealth", "diamond", "gold", "banker", "luxur", "splendid",
        "francs", "estate", "jewel")
POOR = ("poor", "prison", "dungeon", "ruin", "bankrupt", "misery", "debt", "starv", "beggar", "wretched",
        "cell", "chains")
CHAPTER = re.compile(r"^=== CHAPTER (\d+) ===\n", re.MULTILINE)


def policy(characters: dict[str, list[str]], per_call: int) -> TurnScript:
    turns = [
        Turn("print(len(chapters), 'chapters,', sum(len(c) for c in chapters), 'characters')\n"
             "print(chapters[0][:200])\nprint(task[:600])",
             "Look at the inputs before reading the book."),
        Turn("import json\n"
             f"CHARACTERS = {json.dumps(characters, ensure_ascii=False)}\n"
             f"PER_CALL = {per_call}\n"
             "prompts = []\n"
             "for start in range(0, len(chapters), PER_CALL):\n"
             "    body = '\\n\\n'.join(f'=== CHAPTER {start + i + 1} ===\\n{text}'\n"
             "                         for i, text in enumerate(chapters[start:start + PER_CALL]))\n"
             "    prompts.append(f'{task}\\nCHARACTERS: {json.dumps(CHARACTERS, ensure_ascii=False)}\\n'\n"
             "                   f'Answer with a JSON list of rows only.\\n\\n{body}')\n"
             "answers = llm_query_batched(prompts)\n"
             "rows, unparsed = [], []\n"
             "for answer in answers:\n"
             "    try:\n        rows.extend(json.loads(answer))\n"
             "    except ValueError:\n        unparsed.append(answer[:100])\n"
             "print(len(prompts), 'calls,', len(rows), 'rows,', len(unparsed), 'unparsed')",
             "Fan the chapters out in batches and collect JSON rows."),
        Turn("import collections\n"
             "def canonical(name):\n"
             "    for key, variants in CHARACTERS.items():\n"
             "        if name == key or any(v.lower() in str(name).lower() for v in variants):\n"
             "            return key\n"
             "wealth_data = []\n"
             "for row in rows:\n"
             "    name = canonical(row.get('character'))\n"
             "    if name and 1 <= int(row.get('wealth', 0)) <= 10:\n"
             "        wealth_data.append({'chapter': int(row['chapter']), 'character': name,\n"
             "                            'wealth': int(row['wealth']), 'event': str(row.get('event', ''))})\n"
             "print(collections.Counter(r['character'] for r in wealth_data))",
             "Fold name variants and validate rows."),
        Turn("SUBMIT(wealth_data=wealth_data)", "Submit the rows."),
    ]
    return TurnScript(turns, sub_answer=answer)


def answer(prompt: str) -> str:
    """Rows for every listed character mentioned in each chapter of the prompt, scored from the words around
    the mentions."""
    line = next((l for l in prompt.splitlines() if l.startswith("CHARACTERS: ")), None)
    if line is None:
        return "[]"
    characters = json.loads(line[len("CHARACTERS: "):])
    marks = list(CHAPTER.finditer(prompt))
    rows = []
    for mark, following in zip(marks, marks[1:] + [None]):
        text = prompt[mark.end(): following.start() if following else len(prompt)]
        for name, variants in characters.items():
            spots = [m.start() for v in variants for m in re.finditer(r"\b" + re.escape(v) + r"\b", text)]
            if not spots:
                continue
            near = " ".join(text[max(0, s - 300): s + 300].lower() for s in spots[:40])
            rich, poor = sum(near.count(w) for w in RICH), sum(near.count(w) for w in POOR)
            wealth = max(1, min(10, round(5 + 5 * (rich - poor) / (rich + poor + 2))))
            first = min(spots)
            start = max(text.rfind(".", 0, first) + 1, 0)
            end = text.find(".", first)
            event = " ".join(text[start: end + 1 if end > 0 else first + 160].split())[:200]
            rows.append({"chapter": int(mark.group(1)), "character": name, "wealth": wealth, "event": event})
    return json.dumps(rows, ensure_ascii=False)
