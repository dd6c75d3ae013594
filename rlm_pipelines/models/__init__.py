"""Models: a `ModelSpec` (config) becomes a litellm caller (`LLMClient`, the repo engine) or a `dspy.LM`
(`build_dspy_lm`, the document engine); both share keys, prices, the retry policy and the usage ledger.
`scripted` is the offline provider. Nothing here imports litellm or dspy until it is used."""

from typing import Any, Optional

from rlm_pipelines.config import ModelSpec
from rlm_pipelines.models.litellm_client import (
    Completion,
    LLMClient,
    MissingKeyError,
    ModelError,
    check_key,
    register_prices,
    sub_spec,
)
from rlm_pipelines.models.usage import CallRecord, Usage, UsageLedger

__all__ = ["CallRecord", "Completion", "LLMClient", "MissingKeyError", "ModelError", "ModelSpec", "Usage",
           "UsageLedger", "build_dspy_lm", "check_key", "register_prices", "sub_spec"]


def build_dspy_lm(spec: ModelSpec, ledger: Optional[UsageLedger] = None, role: str = "",
                  deadline: Optional[float] = None, hook: Any = None, calls: Any = None) -> Any:
    """See `rlm_pipelines.models.dspy_lm.build_dspy_lm` (a wrapper, so dspy is imported only when asked for)."""
    from rlm_pipelines.models.dspy_lm import build_dspy_lm as build

    return build(spec, ledger, role, deadline, hook, calls)
