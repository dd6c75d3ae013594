"""Credentials in repo URLs: taken out before anything is stored, mounted or shown, and redacted from records.

`task.repo=https://user:TOKEN@host/repo.git` works, but the token must reach no record, no sandbox and no
console: `take_credentials` swaps the URL for its clean form at the start of a run and keeps the credential
in this process only; the host's git fetch gets it as an HTTP header passed through the environment
(`git_auth_env`), never on a command line nor in a config file, so the mirror's config holds the clean URL.
Every secret seen is also redacted from text (`text`, `data`, `redact_file`, log records), and any
`scheme://user:password@` in text is masked, as a net for what was never seen here.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from rlm_pipelines.text import map_strings, safe_text

MASK = "***"
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@:\"']+:[^\s/@\"']+@")
MIN_SECRET = 4  # shorter parts are not redacted on their own (they would mangle every record)

_lock = threading.Lock()
_secrets: set[str] = set()
_credentials: dict[str, tuple[str, str]] = {}  # clean URL -> (user, password)


def split_url(url: str) -> tuple[str, Optional[tuple[str, str]]]:
    """(the URL without its credential, (user, password) decoded or None). HTTP(S) URLs lose their whole
    user part (a token may be the user name); other schemes keep the user (ssh needs it), lose a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    if not parts.scheme or "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    if parts.scheme.lower() in ("http", "https"):
        netloc = host
    elif has_password:
        netloc = f"{user}@{host}"
    else:
        return url, None
    return urlunsplit(parts._replace(netloc=netloc)), (unquote(user), unquote(password))


def remember(url: str) -> str:
    """The clean form of `url`; its credential (if any) is kept for `git_auth_env` and redacted from now on."""
    clean, credential = split_url(url)
    if credential is None:
        return url
    user, password = credential
    raw = urlsplit(url).netloc.rpartition("@")[0]
    raw_secret = raw.partition(":")[2] if password else raw  # a user name beside a password is no secret
    header = base64.b64encode(f"{user}:{password}".encode()).decode()
    with _lock:
        _credentials[clean] = credential
        _secrets.update(s for s in (raw, raw_secret, password or user, header) if len(s) >= MIN_SECRET)
    return clean


def take_credentials(config: Any) -> Any:
    """`config` (a dict or an OmegaConf config, changed in place and returned) with `task.repo` clean."""
    task = config.get("task") if hasattr(config, "get") else None
    repo = task.get("repo") if task is not None and hasattr(task, "get") else None
    if isinstance(repo, str) and repo:
        clean = remember(repo)
        if clean != repo:
            task["repo"] = clean
    return config


def git_auth_env(url: str) -> dict[str, str]:
    """Environment that gives git the credential of `url` (a clean URL) as an HTTP header scoped to it;
    {} when there is none. Environment, not `-c`: command lines are visible to every user of the host."""
    with _lock:
        credential = _credentials.get(url)
    if credential is None or not url.lower().startswith(("http://", "https://")):
        return {}
    token = base64.b64encode(":".join(credential).encode()).decode()
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"http.{url}.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {token}"}


def has_credential(url: str) -> bool:
    with _lock:
        return url in _credentials


def text(value: str) -> str:
    """`value` with every known secret, and any user:password in a URL, masked."""
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in value:
            value = value.replace(secret, MASK)
    return USERINFO.sub(rf"\1{MASK}@", value)


def data(value: Any) -> Any:
    """`text` applied to every string in nested dicts and lists."""
    return map_strings(text, value)


def redact_file(path: Path) -> None:
    """Rewrite a text file (e.g. Hydra's .hydra/*.yaml copies of the command line) with secrets masked."""
    try:
        before = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    after = text(before)
    if after != before:
        path.write_text(after, encoding="utf-8")


def remember_arguments(argv: list[str]) -> None:
    """Register the credentials of `task.repo=...` command-line overrides (a sweep's comma list too) before
    Hydra reads them: its launcher logs every job's overrides."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "task.repo":
            for url in value.split(","):
                remember(url.strip().strip("'\""))


def install_log_redaction() -> None:
    """Mask secrets in every log record as it is made, whichever logger or handler (Hydra's included); lone
    surrogates (model or sandbox text) become U+FFFD there too, so no handler fails to write a line."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it later, as it would have
            return record
        cleaned = safe_text(text(message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record
    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
