"""needles: a synthetic long-context task with an exact score, for sweeps that compare quality.

Shipping logs generated deterministically from a seed hide sentences that label crates by colour; the run
must count the crates of each colour across all logs. The score is the share of labels counted exactly.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlm_pipelines.models.scripted import Turn, TurnScript
from rlm_pipelines.tasks import DocumentTask, TaskParams

PROMPTS = Path(__file__).parent / "prompts"
WORDS = ("cargo manifest tide harbour crane ledger quay vessel berth freight hull rope pallet customs clerk "
         "tally shift barge anchor winch lantern bollard container schedule").split()
NEEDLE = "The crate at dock {dock} is labelled {label}."
FOUND = re.compile(r"The crate at dock \d+ is labelled (\w+)\.")


@dataclass
class NeedlesParams(TaskParams):
    seed: int = 7
    documents: int = 120  # how many logs
    doc_chars: int = 6000  # characters of filler per log
    labels: list[str] = field(default_factory=lambda: ["red", "green", "blue", "amber"])
    needles: int = 60  # labelled crates hidden across all logs
    docs_per_call: int = 10  # logs per llm_query prompt in the scripted policy


def generate(params: NeedlesParams) -> tuple[list[str], dict[str, int]]:
    """The logs and the true counts, the same for the same seed."""
    rng = random.Random(params.seed)
    docs = [[" ".join(rng.choice(WORDS) for _ in range(params.doc_chars // 7))] for _ in range(params.documents)]
    truth = {label: 0 for label in params.labels}
    for _ in range(params.needles):
        label = rng.choice(params.labels)
        truth[label] += 1
        rng.choice(docs).append(NEEDLE.format(dock=rng.randint(1, 99), label=label))
    for doc in docs:
        rng.shuffle(doc)
    return [f"# log {i}\n" + " ".join(parts) for i, parts in enumerate(docs)], truth


class Needles(DocumentTask):
    name = "needles"
    params = NeedlesParams
    signature = "documents: list[str], question: str -> counts: dict[str, int]"
    instructions = (PROMPTS / "instructions.md").read_text(encoding="utf-8").strip()

    def check(self, params: NeedlesParams) -> None:
        if params.documents < 1 or not params.labels:
            raise ValueError("task.documents must be >= 1 and task.labels must name at least one label")
        if params.doc_chars < 0 or params.needles < 0 or params.docs_per_call < 1:
            raise ValueError("task.doc_chars and task.needles must be >= 0, task.docs_per_call >= 1")

    def input_sizes(self, params: NeedlesParams) -> list[tuple[str, int]]:
        return [("task.documents x task.doc_chars", params.documents * params.doc_chars)]

    def build_inputs(self, params: NeedlesParams) -> dict[str, Any]:
        docs, _ = generate(params)
        question = f"How many crates are labelled each of: {', '.join(params.labels)}?"
        return {"documents": docs, "question": question}

    def score(self, result: dict[str, Any], inputs: dict[str, Any], params: NeedlesParams) -> Optional[float]:
        _, truth = generate(params)
        counts = result.get("counts") or {}
        return sum(int(counts.get(label, -1)) == n for label, n in truth.items()) / len(truth)

    def script(self, params: NeedlesParams) -> Any:
        return TurnScript([
            Turn("print(len(documents), 'logs,', sum(map(len, documents)), 'characters')\nprint(question)",
                 "Look at the inputs."),
            Turn(f"import json\nLABELS = {json.dumps(params.labels)}\nSTEP = {params.docs_per_call}\n"
                 "parts = llm_query_batched([f'Count the crates labelled each of {LABELS} in these logs. Reply '\n"
                 "    f'with JSON only.\\n\\n' + '\\n'.join(documents[i:i + STEP]) for i in range(0, len(documents), STEP)])\n"
                 "counts = {label: 0 for label in LABELS}\n"
                 "for part in parts:\n    for label, n in json.loads(part).items():\n        counts[label] += n\n"
                 "print(counts)", "Count in parts, add up in code."),
            Turn("SUBMIT(counts=counts)", "Submit."),
        ], sub_answer=_count)


def _count(prompt: str) -> str:
    labels = json.loads(prompt[prompt.index("["): prompt.index("]") + 1].replace("'", '"'))
    found = FOUND.findall(prompt.split("\n\n", 1)[-1])
    return json.dumps({label: found.count(label) for label in labels})


task = Needles()
