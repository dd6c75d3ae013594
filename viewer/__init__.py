"""The run viewer: a static app (`index.html`, `app.js`, `style.css`) that every run folder gets a copy of
with its data beside it (`bundle.py`), so it opens from disk; `python -m rlm_pipelines.viewer` serves a run
picker over many runs. Installed as `rlm_pipelines.viewer` (the folder is top-level in the checkout)."""

from rlm_pipelines.viewer.bundle import write_bundle

__all__ = ["write_bundle"]
