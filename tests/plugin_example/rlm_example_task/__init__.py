"""A third-party task plugin, as another package would ship one (installed by the tests)."""

from dataclasses import dataclass

from rlm_pipelines.models.scripted import Turn, TurnScript
from rlm_pipelines.tasks import DocumentTask, RepoParams, RepoTask, TaskParams


@dataclass
class SlowEchoParams(TaskParams):
    text: str = "hello"
    sleep_s: float = 0.0


class SlowEcho(DocumentTask):
    name = "slow_echo"
    params = SlowEchoParams
    signature = "text: str -> echoed: str"
    instructions = "Echo `text` in capitals."

    def build_inputs(self, params):
        return {"text": params.text}

    def script(self, params):
        return TurnScript([Turn(f"import time\nprint('working')\ntime.sleep({params.sleep_s})"),
                           Turn("SUBMIT(echoed=text.upper())")])


task = SlowEcho()


@dataclass
class StuckRepoParams(RepoParams):
    prompt: str = "wait"


class StuckRepo(RepoTask):
    """A repo task whose root spawns two children that sit in a long cell: for Ctrl-C tests."""

    name = "stuck_repo"
    params = StuckRepoParams

    def script(self, params):
        from rlm_pipelines.models.scripted import DepthScript

        return DepthScript({0: [Turn("print(rlm_query_batched(['sleep', 'sleep']))")],
                            1: [Turn("import time\nprint('child waiting')\ntime.sleep(300)")]})


stuck_repo = StuckRepo()
