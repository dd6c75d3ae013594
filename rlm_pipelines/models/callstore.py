"""Every model call of a run, content-addressed: recorded (`calls.jsonl` in the run folder), replayed
(`model=replay model.source=<run dir>`), cached across runs (`model.cache`) and resumed (`resume=<run dir>`).

One design for all four: a call's key is a hash of what changes its answer (model, messages, sampling
parameters; never keys, headers or timeouts). A `CallStore` answers a key or not; `Calls` asks its stores
in order (the replayed or resumed run's calls, then the disk cache), else makes the call live, and appends
every call, however answered, to the run's `calls.jsonl`. Both engines go through `Calls.call`: the repo
engine from `LLMClient.complete`, the document engine from `RecordingLM.__call__`.

Recorded calls are matched by agent and key, and the n-th occurrence of a key within its agent — never by
arrival order, so concurrent sub-agents replay right. The agent is a context variable (`agent_scope`): the
repo engine's agents set a path of their task hashes, the document engine's calls are "root" or "sub".
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

from rlm_pipelines import redact
from rlm_pipelines.budget import BudgetExceeded
from rlm_pipelines.text import clip, safe_data

CALLS_FILE = "calls.jsonl"
# Request arguments that never change the answer (or must never be written): left out of keys and records.
NOT_IN_KEY = {"timeout", "num_retries", "headers", "extra_headers", "rollout_id", "cache", "api_key",
              "api_base", "base_url", "api_version", "organization", "stream_options"}

# A recorded message's text beyond this is clipped (head and tail kept) in calls.jsonl and the cache: keys
# are made from the whole prompt and a replay needs only the key; the text is kept to show divergences.
MESSAGE_CHARS = 20_000

_agent: contextvars.ContextVar[str] = contextvars.ContextVar("rlm_call_agent", default="")


class ReplayMiss(BudgetExceeded):
    """A call the replayed run did not make: the run diverged (the task, the code or a prompt changed).
    A BudgetExceeded (status error), so it ends the whole run like a spent budget, never retried; once one
    call missed, every later miss repeats the first one's message (it names where the run diverged)."""

    def __init__(self, message: str):
        super().__init__(message, status="error", limit="replay")


@contextlib.contextmanager
def agent_scope(agent: str) -> Iterator[None]:
    """Calls made inside are this agent's (a stable name: the same agent in a replay gets the same one)."""
    token = _agent.set(agent)
    try:
        yield
    finally:
        _agent.reset(token)


def current_agent(default: str = "") -> str:
    return _agent.get() or default


def agent_path(parent: str, task: str) -> str:
    """A sub-agent's stable name: its parent's and a hash of its task (spawn order varies between runs)."""
    return f"{parent}/{hashlib.sha256(task.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def request_of(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """What is recorded of a request and hashed into its key: the model, the messages, the parameters that
    change the answer (keys, headers and timeouts dropped)."""
    kept = {k: v for k, v in sorted(params.items()) if k not in NOT_IN_KEY and not k.startswith("api_")}
    return safe_data({"model": model, "messages": messages, "params": kept})


def call_key(request: dict[str, Any]) -> str:
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@runtime_checkable
class CallStore(Protocol):
    """Answers recorded calls by key (None: not here) and keeps new ones."""

    def lookup(self, agent: str, key: str) -> Optional[dict[str, Any]]: ...

    def record(self, entry: dict[str, Any]) -> None: ...


class DiskCache:
    """`<cache>/calls/<2 hex>/<key>.json`, shared by every run; a write goes to a temp file then
    `os.replace`, so concurrent writers of one entry leave a whole entry (the last one's)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def lookup(self, agent: str, key: str) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, or unreadable: a miss
            return None

    def record(self, entry: dict[str, Any]) -> None:
        path = self._path(entry["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(entry, out, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class RecordedCalls:
    """A run folder's `calls.jsonl`, read-only: each key answered per agent, its n-th occurrence by the n-th
    lookup (identical prompts of one agent replay in order)."""

    def __init__(self, run_dir: Path):
        path = Path(run_dir) / CALLS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: model.source / resume must name a run folder "
                                    f"recorded by this version (it writes {CALLS_FILE})")
        self.path = path
        self.by_agent: dict[str, list[dict[str, Any]]] = {}
        self._index: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._used: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("ok", True):
                    self.by_agent.setdefault(entry["agent"], []).append(entry)
                    self._index.setdefault((entry["agent"], entry["key"]), []).append(entry)

    def lookup(self, agent: str, key: str) -> Optional[dict[str, Any]]:
        with self._lock:
            entries = self._index.get((agent, key), [])
            n = self._used.get((agent, key), 0)
            if n >= len(entries):
                return None
            self._used[(agent, key)] = n + 1
            return entries[n]

    def record(self, entry: dict[str, Any]) -> None:
        pass  # the source run's record is never changed

    def divergence(self, agent: str, index: int, request: dict[str, Any]) -> str:
        """Why a call is not in the record: the agent, its call number and the first line where the prompt
        differs from the nearest recorded prompt of that agent."""
        where = f"agent {agent!r}, iteration/call {index + 1}"
        recorded = self.by_agent.get(agent)
        if not recorded:
            known = ", ".join(sorted(self.by_agent)[:5]) or "none"
            return f"{where}: the recorded run has no calls of this agent (its agents: {known})"
        lines = _lines(_clipped(request))  # compared as recorded
        best = max(recorded, key=lambda e: _common_lines(lines, _lines(e["request"])))
        theirs = _lines(best["request"])
        i = _common_lines(lines, theirs)
        ours_line = lines[i] if i < len(lines) else "(end of prompt)"
        theirs_line = theirs[i] if i < len(theirs) else "(end of prompt)"
        return (f"{where}: the prompt was not recorded; first differing line (line {i + 1}, vs the nearest "
                f"recorded prompt, its call {best.get('index', 0) + 1}):\n  now:      {ours_line[:300]!r}\n"
                f"  recorded: {theirs_line[:300]!r}")


def _clipped(request: dict[str, Any]) -> dict[str, Any]:
    messages = [{**m, "content": clip(m["content"], MESSAGE_CHARS, note="clipped in calls.jsonl")}
                if isinstance(m.get("content"), str) else m for m in request.get("messages") or []]
    return {**request, "messages": messages}


def _lines(request: dict[str, Any]) -> list[str]:
    text = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in request.get("messages") or [])
    return [*text.splitlines(), f"[params] {json.dumps(request.get('params'), sort_keys=True)}"]


def _common_lines(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Answer:
    """A call's response as the engine stores it (`response`), its usage and where it came from."""

    response: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float  # what the run is charged: recorded cost when replayed, 0 when cached
    origin: str = "live"  # live | cached | replayed
    saved_usd: float = 0.0  # a cached call: what it cost when it was made


class Calls:
    """The call path of one run: `replay` (model.source: a miss stops, or goes live with on_miss=live),
    `resume` (a miss goes live), `cache` (DiskCache or None), every call appended to `log` (calls.jsonl)."""

    def __init__(self, log: Optional[Path] = None, replay: Optional[RecordedCalls] = None,
                 on_miss: str = "stop", resume: Optional[RecordedCalls] = None, cache: Optional[DiskCache] = None):
        self.log, self.replay, self.on_miss, self.resume, self.cache = log, replay, on_miss, resume, cache
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self.miss: Optional[ReplayMiss] = None
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)

    def _index(self, agent: str) -> int:
        with self._lock:
            n = self._counts.get(agent, 0)
            self._counts[agent] = n + 1
            return n

    def call(self, request: dict[str, Any], live: Callable[[], Answer], role: str = "",
             use_cache: bool = False) -> Answer:
        """Answer `request` from the stores, else by `live()`; record it either way. A failed live call is
        recorded (ok: false) and raised."""
        pending, answer = self.begin(request, role, use_cache)
        if answer is None:
            try:
                answer = live()
            except BaseException as exc:
                self.failed(pending, exc)
                raise
        return self.done(pending, answer)

    def begin(self, request: dict[str, Any], role: str = "", use_cache: bool = False) -> tuple[dict, Optional[Answer]]:
        """The first half of `call` (for async callers): the stored answer, or None to call live; raises
        ReplayMiss when a replay has no answer and must not go live."""
        agent = current_agent(role or "main")
        index, key = self._index(agent), call_key(request)
        pending = {"key": key, "agent": agent, "index": index, "role": role, "request": _clipped(request),
                   "started": time.perf_counter(), "use_cache": use_cache}
        answer = self._stored(agent, key, use_cache)
        if answer is None and self.replay is not None and self.on_miss != "live":
            with self._lock:
                if self.miss is None:
                    self.miss = ReplayMiss(f"replay of {self.replay.path.parent} diverged at "
                                           f"{self.replay.divergence(agent, index, request)}\n(model.on_miss=live "
                                           f"continues with the live model from there)")
            raise ReplayMiss(str(self.miss))
        return pending, answer

    def failed(self, pending: dict[str, Any], exc: BaseException) -> None:
        started, _ = pending.pop("started"), pending.pop("use_cache")
        self._append({**pending, "ok": False, "error": str(exc)[:2000],
                      "latency_s": round(time.perf_counter() - started, 4)})

    def done(self, pending: dict[str, Any], answer: Answer) -> Answer:
        started, use_cache = pending.pop("started"), pending.pop("use_cache")
        entry = {**pending, "ok": True, "response": answer.response,
                 "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens},
                 # a cached call keeps what it cost when made, so a resume of this run can count it saved
                 "cost_usd": answer.cost_usd + answer.saved_usd, "latency_s": round(time.perf_counter() - started, 4),
                 "origin": answer.origin, "at": time.time()}
        self._append(entry)
        if answer.origin == "live" and use_cache and self.cache is not None:
            self.cache.record(redact.data(safe_data(entry)))
        return answer

    def _stored(self, agent: str, key: str, use_cache: bool) -> Optional[Answer]:
        if self.replay is not None:
            entry = self.replay.lookup(agent, key)
            if entry is not None:
                return _answer(entry, "replayed")
        for store in (self.resume, self.cache if use_cache else None):
            entry = store.lookup(agent, key) if store is not None else None
            if entry is not None:
                return _answer(entry, "cached")
        return None

    def _append(self, entry: dict[str, Any]) -> None:
        if self.log is None:
            return
        line = json.dumps(redact.data(safe_data(entry)), ensure_ascii=False, default=str)
        with self._lock, open(self.log, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def _answer(entry: dict[str, Any], origin: str) -> Answer:
    usage, cost = entry.get("usage") or {}, float(entry.get("cost_usd") or 0.0)
    return Answer(entry["response"], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                  cost if origin == "replayed" else 0.0, origin, cost if origin == "cached" else 0.0)


def cache_on(spec: Any) -> bool:
    """`model.cache`: true, false, or null (on at temperature 0). Scripted models are never cached: they
    are free and deterministic already."""
    if spec.model.startswith("scripted/"):
        return False
    return bool(spec.temperature == 0) if spec.cache is None else bool(spec.cache)


def recorded_model(source: str) -> dict[str, Any]:
    """The model config of a recorded run (its run.json), which a replay calls with so keys match."""
    path = Path(source).expanduser() / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["config"]["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(f"model.source={source!r}: cannot read the recorded run's model from {path} "
                                f"({exc}); name a run folder (it holds run.json and {CALLS_FILE})") from None


def replay_spec(spec: Any) -> Any:
    """The ModelSpec a replay calls with: the recorded run's model, with this config's source, on_miss and
    cache (and name, for the output folder)."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from rlm_pipelines.config import ModelSpec

    recorded = recorded_model(spec.source)
    recorded = {k: v for k, v in recorded.items() if k not in ("source", "on_miss", "cache", "name")}
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelSpec), recorded))
    # Where the live model is reached (on_miss=live) may differ from the recording's: set here, it wins.
    reach = {k: getattr(spec, k) for k in ("api_base", "api_key_env") if getattr(spec, k) is not None}
    sub = replace(typed.sub, **{k: getattr(spec.sub, k) for k in ("api_base", "api_key_env")
                                if getattr(spec.sub, k) is not None})
    return replace(typed, **reach, sub=sub, name=spec.name, source=spec.source, on_miss=spec.on_miss,
                   cache=spec.cache)


def build_calls(cfg: Any, run_dir: Path) -> Calls:
    """The run's call path from its config: model.source / model.on_miss, resume, model.cache."""
    from rlm_pipelines.paths import cache_dir

    spec = cfg.model
    replay = RecordedCalls(Path(spec.source).expanduser()) if spec.source else None
    resume = RecordedCalls(Path(cfg.resume).expanduser()) if cfg.resume else None
    return Calls(Path(run_dir) / CALLS_FILE, replay, spec.on_miss, resume, DiskCache(cache_dir("calls")))
