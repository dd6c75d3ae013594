"""Sandboxes: where model-written code runs. `local` (bubblewrap) is the default; `daytona` is the cloud one."""

from __future__ import annotations

from typing import Optional

from rlm_pipelines.config import SandboxConfig
from rlm_pipelines.sandbox.base import Sandbox, SandboxError, SandboxStartError

KINDS = ("local", "daytona")


def make_sandbox(config: Optional[SandboxConfig] = None, name: str = "sbx",
                 mounts: Optional[dict[str, str]] = None) -> Sandbox:
    """A new, not yet started sandbox of the kind the config names. `mounts` (host path -> path inside)
    are bound read-only where the backend can (local); remote backends have `clone()` for checkouts."""
    config = config or SandboxConfig()
    if config.kind == "local":
        from rlm_pipelines.sandbox.local import LocalSandbox

        return LocalSandbox(config, name, mounts)
    if config.kind == "daytona":
        from rlm_pipelines.sandbox.daytona import DaytonaSandbox

        return DaytonaSandbox(config, name, mounts)
    raise ValueError(f"unknown sandbox kind {config.kind!r}; choose one of: {', '.join(KINDS)}")


def can_fork(config: SandboxConfig) -> bool:
    """Sub-agents' sandboxes are forks of one prepared sandbox: asked for, and the backend can fork."""
    return config.fork_subagents and config.kind == "daytona"


def check_sandbox(config: SandboxConfig) -> None:
    """Fail before anything starts on what would only fail later: an unknown kind, a missing API key."""
    if config.kind not in KINDS:
        raise ValueError(f"unknown sandbox kind {config.kind!r}; choose one of: {', '.join(KINDS)}")
    if config.kind == "daytona":
        from rlm_pipelines.sandbox.daytona import check  # cheap: the SDK is imported only when used

        check(config.daytona)


__all__ = ["Sandbox", "SandboxConfig", "SandboxError", "SandboxStartError", "can_fork", "check_sandbox", "make_sandbox"]
