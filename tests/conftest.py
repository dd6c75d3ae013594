import os

# Never let litellm or dspy reach for the network (price map) during tests.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
