"""doc_qa: answer a question from documents named by files, globs or folders."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlm_pipelines.models.scripted import Turn, TurnScript
from rlm_pipelines.tasks import DocumentTask, TaskParams, file_sizes

PROMPTS = Path(__file__).parent / "prompts"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".yaml", ".yml", ".toml", ".tex", ""}


@dataclass
class DocQAParams(TaskParams):
    documents: list[str] = field(default_factory=list)  # files, globs ("notes/*.md") or folders
    question: str = ""
    max_files: int = 2000


def expand(patterns: list[str], max_files: int) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"task.documents entry {pattern!r} matches no file: give files, globs "
                                    f"(quote them: 'docs/**/*.md') or folders")
        files.extend(found)
    if len(files) > max_files:
        raise ValueError(f"task.documents match {len(files)} files, more than task.max_files={max_files}")
    return files


class DocQA(DocumentTask):
    name = "doc_qa"
    params = DocQAParams
    signature = "documents: list[str], question: str -> answer: str"
    instructions = (PROMPTS / "instructions.md").read_text(encoding="utf-8").strip()

    def check(self, params: DocQAParams) -> None:
        if not params.documents:
            raise ValueError("task.documents is empty: name files, globs or folders, e.g. "
                             "task.documents='[notes/,README.md]'")
        if params.max_files < 1:
            raise ValueError(f"task.max_files={params.max_files} must be >= 1")
        if not params.question.strip():
            raise ValueError("task.question is empty: say what to answer, e.g. task.question='Who wrote it?'")
        expand(params.documents, params.max_files)

    def input_sizes(self, params: DocQAParams) -> list[tuple[str, int]]:
        return file_sizes("task.documents", expand(params.documents, params.max_files))

    def build_inputs(self, params: DocQAParams) -> dict[str, Any]:
        texts = [f"# file: {p}\n{p.read_text(encoding='utf-8', errors='replace')}"
                 for p in expand(params.documents, params.max_files)]
        return {"documents": texts, "question": params.question}

    def script(self, params: DocQAParams) -> Any:
        return TurnScript([
            Turn("print(len(documents), 'documents,', sum(map(len, documents)), 'characters')\n"
                 "print([d.splitlines()[0] for d in documents][:20])", "Look at the inputs."),
            Turn("partial = llm_query_batched([f'Question: {question}\\nQuote the sentence of this document that '\n"
                 "    f'answers it, or say NONE.\\n\\n{d}' for d in documents])\n"
                 "found = [(d.splitlines()[0][8:], a) for d, a in zip(documents, partial) if a != 'NONE']\n"
                 "print(found[:10])", "Ask about every document at once."),
            Turn("answer = llm_query(f'Combine into one answer to: {question}\\n' + '\\n'.join(\n"
                 "    f'{name}: {a}' for name, a in found)) if found else 'The documents do not answer this.'\n"
                 "SUBMIT(answer=answer)", "Combine and submit."),
        ], sub_answer=_answer)


def _answer(prompt: str) -> str:
    """Deterministic sub-model: the sentence sharing most words with the question, or NONE."""
    if prompt.startswith("Combine into one answer to: "):
        return " ".join(line.split(": ", 1)[-1] for line in prompt.splitlines()[1:])
    question = prompt.splitlines()[0][len("Question: "):]
    words = {w for w in re.findall(r"[a-z0-9]+", question.lower()) if len(w) > 3}
    body = prompt.split("\n\n", 1)[-1]
    best, score = "NONE", 0
    for sentence in re.split(r"(?<=[.!?])\s+", body):
        hits = len(words & set(re.findall(r"[a-z0-9]+", sentence.lower())))
        if hits > score:
            best, score = " ".join(sentence.split())[:300], hits
    return best if score >= 2 else "NONE"


task = DocQA()
