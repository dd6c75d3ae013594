"""Sandboxes: where model-written code runs. `local` (bubblewrap) is the default; `daytona` is the cloud one."""

from __future__ import annotations

from typing import Optional

from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.sandbox.base import Sandbox, SandboxError, SandboxStartError


def make_sandbox(config: Optional[SandboxConfig] = None, name: str = "sbx",
                 mounts: Optional[dict[str, str]] = None) -> Sandbox:
    """A new, not yet started sandbox of the kind the config names. `mounts` (host path -> path inside)
    are bound read-only."""
    config = config or SandboxConfig()
    if config.kind == "local":
        from rlm_pipelines.sandbox.local import LocalSandbox

        return LocalSandbox(config, name, mounts)
    raise ValueError(f"unknown sandbox kind {config.kind!r}; choose one of: local")


__all__ = ["Sandbox", "SandboxConfig", "SandboxError", "SandboxStartError", "make_sandbox"]
