"""Models: a `ModelSpec` (config) becomes a litellm caller or a `dspy.LM`; usage and cost are recorded per
call; `scripted` is the offline provider. Nothing here imports litellm or dspy until it is used."""

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
from rlm_pipelines.models.usage import CallRecord, UsageLedger

__all__ = ["CallRecord", "Completion", "LLMClient", "MissingKeyError", "ModelError", "ModelSpec", "UsageLedger",
           "build_dspy_lm", "check_key", "register_prices", "sub_spec"]


def build_dspy_lm(spec, ledger=None, role=""):  # noqa: D103 - lazy: dspy is imported only when asked for
    from rlm_pipelines.models.dspy_lm import build_dspy_lm as build

    return build(spec, ledger, role)
