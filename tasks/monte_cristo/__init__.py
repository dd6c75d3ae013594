"""monte_cristo: the wealth of five characters across all 117 chapters of The Count of Monte Cristo.

What the Daytona DSPy guide's demo does, done properly: the book is fetched (and cached) or read from
`task.source`, cut into its 117 chapters, read by a dspy.RLM that fans chapters out to a sub-model with
`llm_query_batched`, and the wealth series are plotted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlm_pipelines.tasks import DocumentTask, TaskParams, file_sizes
from rlm_tasks.monte_cristo import book, plot, script

PROMPTS = Path(__file__).parent / "prompts"

DEFAULT_CHARACTERS = {
    "Dantès": ["Dantès", "Dantes", "Edmond", "Monte Cristo", "the count", "Sinbad", "Busoni", "Wilmore"],
    "Danglars": ["Danglars"],
    "Fernand": ["Fernand", "Mondego", "Morcerf"],
    "Villefort": ["Villefort"],
    "Mercédès": ["Mercédès", "Mercedes"],
}


@dataclass
class MonteCristoParams(TaskParams):
    # A local copy of Gutenberg #1184; empty = download it once into the cache (~/.cache/rlm-pipelines).
    source: Optional[str] = None
    # Canonical name -> the names the book uses for that character.
    characters: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_CHARACTERS))
    chapters_per_call: int = 3  # chapters in one llm_query prompt (the scripted policy's batching)
    smoothing_window: int = 7  # chapters in the plot's moving average


class MonteCristo(DocumentTask):
    name = "monte_cristo"
    params = MonteCristoParams
    signature = "chapters: list[str], task: str -> wealth_data: list[dict]"
    instructions = (PROMPTS / "instructions.md").read_text(encoding="utf-8").strip()

    def check(self, params: MonteCristoParams) -> None:
        if params.source and not Path(params.source).expanduser().is_file():
            raise FileNotFoundError(f"task.source={params.source!r} is not a file: give the path of the Gutenberg "
                                    f"text #1184, or leave task.source empty to download it")
        if not params.characters:
            raise ValueError("task.characters is empty: name at least one character")
        if params.chapters_per_call < 1 or params.smoothing_window < 1:
            raise ValueError("task.chapters_per_call and task.smoothing_window must be >= 1")

    def input_sizes(self, params: MonteCristoParams) -> list[tuple[str, int]]:
        return file_sizes("task.source", [Path(params.source).expanduser()] if params.source else [])

    def build_inputs(self, params: MonteCristoParams) -> dict[str, Any]:
        chapters = book.split_chapters(book.load_text(params.source))
        lines = "\n".join(f"- {name}: {', '.join(variants)}" for name, variants in params.characters.items())
        task_text = (PROMPTS / "task.md").read_text(encoding="utf-8").strip().format(characters=lines)
        return {"chapters": chapters, "task": task_text}

    def script(self, params: MonteCristoParams) -> Any:
        return script.policy(params.characters, params.chapters_per_call)

    def normalize(self, result: dict[str, Any], params: MonteCristoParams) -> dict[str, Any]:
        return {"wealth_data": plot.fold_rows(result.get("wealth_data") or [], params.characters)}

    def downstream(self, result: dict[str, Any], inputs: dict[str, Any], params: MonteCristoParams,
                   run_dir: Path, model: str = "") -> list[str]:
        rows = plot.fold_rows(result.get("wealth_data") or [], params.characters)
        series = plot.plot_wealth(rows, list(params.characters), len(inputs["chapters"]),
                                  run_dir / "plots" / "wealth_trajectories.png", params.smoothing_window, model)
        (run_dir / "plots" / "wealth_trajectories.json").write_text(json.dumps(series, ensure_ascii=False, indent=1))
        return ["plots/wealth_trajectories.png", "plots/wealth_trajectories.json"]


task = MonteCristo()
