"""Sandboxes: where model-written code runs. `local` (bubblewrap) is the default; `daytona` is the cloud one.

`BACKENDS` is the one place a `sandbox.kind` is looked at: everything else asks the backend class (its
config schema, `describe`) or the sandbox itself (`isinstance(sandbox, SupportsClone)`). Backends are
imported when first used; this package imports no config at load time, because `config.py` imports
`sandbox.base`.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Optional

from rlm_pipelines.sandbox.base import (REPO_DIR, WORKSPACE, BaseSandbox, DownloadTooLarge, Sandbox,
                                        SandboxConfigError, SandboxError, SandboxStartError, SupportsClone,
                                        SupportsFork, SupportsHostView, SupportsSeed)

if TYPE_CHECKING:
    from rlm_pipelines.config import SandboxConfig

BACKENDS = {  # sandbox.kind -> the backend class ("module:Class", imported when used)
    "local": "rlm_pipelines.sandbox.local:LocalSandbox",
    "daytona": "rlm_pipelines.sandbox.daytona:DaytonaSandbox",
}


def backend(kind: str) -> type[BaseSandbox]:
    """The backend class of a `sandbox.kind`."""
    if kind not in BACKENDS:
        raise SandboxConfigError(f"unknown sandbox kind {kind!r}; choose one of: {', '.join(BACKENDS)}")
    module, name = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def typed_config(config: Any) -> "SandboxConfig":
    """`config` as its backend's own schema, validated: a composed or saved dict, a plain `SandboxConfig`
    (the backend's defaults fill in the rest), or already the right schema (returned as it is)."""
    from omegaconf import OmegaConf

    from rlm_pipelines.config import SandboxConfig

    if config is None:
        config = SandboxConfig()
    if isinstance(config, SandboxConfig):
        schema = backend(config.kind).config_class
        if isinstance(config, schema):
            return config
        if type(config) is not SandboxConfig:
            raise SandboxConfigError(f"sandbox.kind={config.kind} needs a {schema.__name__}, not a "
                                     f"{type(config).__name__}")
        config = {f.name: getattr(config, f.name) for f in fields(SandboxConfig)}
    schema = backend(config.get("kind", "local")).config_class
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), config))  # type: ignore[return-value]


def make_sandbox(config: Optional["SandboxConfig"] = None, name: str = "sbx",
                 mounts: Optional[dict[str, str]] = None) -> Sandbox:
    """A new, not yet started sandbox of the kind the config names. `mounts` (host path -> path inside)
    are bound read-only where the backend can (local); `SupportsClone` backends check repos out themselves."""
    config = typed_config(config)
    return backend(config.kind)(config, name, mounts)  # type: ignore[call-arg]


def can_fork(config: "SandboxConfig") -> bool:
    """Sub-agents' sandboxes are forks of one prepared sandbox: asked for, and the backend can fork."""
    return config.fork_subagents and issubclass(backend(config.kind), SupportsFork)


def describe(config: Optional["SandboxConfig"]) -> dict[str, str]:
    """What code in this config's sandboxes gets, as the backend says: `python`, `isolation`, `workdir`, `limits`."""
    config = typed_config(config)
    return backend(config.kind).describe(config)


def check_sandbox(config: "SandboxConfig") -> None:
    """Fail before anything starts on what would only fail later: an unknown kind, a missing API key."""
    config = typed_config(config)
    backend(config.kind).check(config)


__all__ = ["BACKENDS", "REPO_DIR", "WORKSPACE", "BaseSandbox", "DownloadTooLarge", "Sandbox", "SandboxConfigError",
           "SandboxError", "SandboxStartError", "SupportsClone", "SupportsFork", "SupportsHostView", "SupportsSeed",
           "backend", "can_fork",
           "check_sandbox", "describe", "make_sandbox", "typed_config"]
