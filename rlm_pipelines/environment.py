"""Environment defaults for the commands (`python -m rlm_pipelines`, `serve`), set before Prefect or litellm
is imported. A user's own settings win (only unset variables are set)."""

from __future__ import annotations

import os

DEFAULTS = {
    # litellm (and dspy through it) would fetch the model price map from the network at import; the bundled
    # map gives the same prices offline. (The package's __init__ sets this one for library users too.)
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # Prefect without a server starts a temporary one in this process: give it time on small machines ...
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # ... and keep it from phoning home or flooding the console.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
