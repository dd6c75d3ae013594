"""The litellm half of the `scripted` provider: the handler litellm calls for `scripted/<name>` models.

A module of its own because it imports litellm at the top (its base class comes from there), and
`scripted` must not: tasks import `scripted` for their scripts, and importing litellm costs seconds.
`scripted.install()` imports this module when a run first needs the provider.
"""

from __future__ import annotations

from typing import Any

import litellm
from litellm import CustomLLM, ModelResponse

from rlm_pipelines.models.scripted import ScriptError, _content, reply


class ScriptedLLM(CustomLLM):
    """Answers from the registered scripts (`scripted.reply`), with token counts estimated from lengths."""

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        model, messages = kwargs.get("model", ""), kwargs.get("messages") or []
        try:
            text = reply(model, messages)
        except ScriptError as exc:  # a 400, not retried (litellm would call a ValueError a
            # dropped connection, i.e. transient, and add a traceback to the message)
            raise litellm.BadRequestError(str(exc), model=model, llm_provider="scripted") from None
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
