"""rlm-pipelines: Recursive Language Models on real work, observable, repeatable and comparable."""

import os

# litellm (and dspy through it) fetch the model price map from the network at import unless told not to.
# This machine class has no internet; users get the same prices offline from the bundled map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
