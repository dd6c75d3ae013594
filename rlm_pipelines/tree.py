"""The run tree: `run.json`, the record of everything a run did.

Schema-versioned (`rlm-pipelines/run@1`, see `schemas/run.schema.json`) and rewritten atomically (a temp
file renamed over the old one) after every iteration, so a crash or Ctrl-C leaves a readable file with
everything up to that point.

Nodes are agents (`kind: agent`, with iterations) and model sub-calls (`kind: llm_call`). Each iteration
lists the ids of the nodes it spawned, recorded as they are created, never inferred afterwards.

Bounded whatever a model does: every text is clipped (`text.clip`), refused sub-agents are counted on their
parent (`refused`) with only a sample kept as nodes, and a record that would still exceed
`limits.max_record_mb` is saved cut (`record_cut`), so run.json never grows with hostile output.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from rlm_pipelines.models.usage import Usage
from rlm_pipelines.records import fit, process_identity, write_atomic
from rlm_pipelines.text import clip

SCHEMA = "rlm-pipelines/run@1"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "run.schema.json"
TEXT_LIMIT = 100_000  # characters of one text field kept in run.json (as much as a cell's output cap)
USAGE_KEYS = tuple(Usage().as_tree())  # what each node counts (the run adds "sandboxes")
REFUSED_KEPT = 20  # refused sub-agents kept as nodes per parent (the rest are only counted)


def _kept(value: Any) -> Any:
    """A field as run.json keeps it: text cut to TEXT_LIMIT, anything else as it is."""
    return clip(value, TEXT_LIMIT) if isinstance(value, str) else value


class RunTree:
    def __init__(self, path: Path, meta: dict[str, Any], max_record_mb: float = 20):
        self.path = Path(path)
        self.max_bytes = int(max_record_mb * 1024 * 1024)
        self.record_cut: Optional[dict[str, Any]] = None  # set when a save had to cut the record
        self._lock = threading.RLock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._spawned: dict[str, list[str]] = {}  # agent id -> children spawned in its current iteration
        self._clock: dict[str, float] = {}  # node id -> monotonic start, for durations
        self.started = time.time()
        self.run: dict[str, Any] = {
            "schema": SCHEMA, "id": meta.pop("id", uuid.uuid4().hex[:12]), "status": "running",
            "process": process_identity(),  # near the top: the next run reads only the head to tell a crash
            "started_at": _now(), "ended_at": None, "duration_s": 0.0,
            "usage": {**Usage().as_tree(), "sandboxes": 0},
            "result": None, "error": None, "root": None, **meta,
        }

    # -- nodes

    def add_node(self, kind: str, task: str, parent_id: Optional[str] = None, **fields: Any) -> str:
        with self._lock:
            node_id = f"{kind[0]}{len(self._nodes)}"
            parent = self._nodes.get(parent_id) if parent_id else None
            node = {"id": node_id, "parent_id": parent_id, "depth": parent["depth"] + 1 if parent else 0,
                    "kind": kind, "task": clip(task, TEXT_LIMIT), "task_chars": len(task), "sandbox_id": None,
                    "status": "running", "started_at": _now(), "ended_at": None, "duration_s": 0.0,
                    "usage": {}, "result": None, "result_truncated": False, "error": None, "iterations": [],
                    "children": [], **{k: _kept(v) for k, v in fields.items()}}
            self._nodes[node_id] = node
            self._clock[node_id] = time.monotonic()
            if parent is None:
                self.run["root"] = node
            else:
                parent["children"].append(node)
                self._spawned.setdefault(parent_id, []).append(node_id)
            return node_id

    def refuse(self, parent_id: str, task: str, reason: str, message: str) -> None:
        """A sub-agent that did not start (`reason`: the limit's key). Counted on the parent; only the first
        REFUSED_KEPT become nodes, so a model calling rlm_query in a loop cannot grow the tree."""
        with self._lock:
            parent = self._nodes[parent_id]
            refused = parent.setdefault("refused", {"count": 0, "reasons": {}, "kept": 0})
            refused["count"] += 1
            refused["reasons"][reason] = refused["reasons"].get(reason, 0) + 1
            if reason != "max_sandboxes" or refused["kept"] >= REFUSED_KEPT:
                return
            refused["kept"] += 1
        node_id = self.add_node("agent", task, parent_id, refusal=reason)
        self.end_node(node_id, "budget_exceeded", result=message, error=f"{reason} reached")

    def partial_reasons(self) -> dict[str, Any]:
        """Why the run's answer may be incomplete (empty when it is not): sub-agents refused, sub-agents
        whose findings were cut for their parent, sub-agents that did not finish, the record cut."""
        with self._lock:
            nodes = [n for n in self._nodes.values() if n["kind"] == "agent" and n["depth"] > 0]
            reasons: dict[str, Any] = {}
            refused: dict[str, int] = {}
            for node in self._nodes.values():
                for reason, n in node.get("refused", {}).get("reasons", {}).items():
                    refused[reason] = refused.get(reason, 0) + n
            if refused:
                reasons["refused"] = refused
            truncated = sum(bool(n["result_truncated"]) for n in nodes)
            unfinished = sum(n["status"] != "ok" and not n.get("refusal") for n in nodes)
            reasons.update({k: v for k, v in (("truncated", truncated), ("unfinished", unfinished)) if v})
            if self.record_cut:
                reasons["record_cut"] = self.record_cut
            return reasons

    def add_llm_call(self, parent_id: str, prompt: str, answer: Optional[str], usage: Optional[dict] = None,
                     error: Optional[str] = None, **fields: Any) -> str:
        """A model call an agent's code made (`usage`: its tokens and dollars, already in the agent's own
        usage through its iteration, so it is not rolled up again)."""
        node_id = self.add_node("llm_call", prompt, parent_id, **fields)
        with self._lock:
            self._nodes[node_id]["usage"]["own"] = {**dict.fromkeys(USAGE_KEYS, 0), **(usage or {})}
        self.end_node(node_id, "error" if error else "ok", result=answer, error=error)
        return node_id

    def end_node(self, node_id: str, status: str, result: Any = None, error: Optional[str] = None,
                 **fields: Any) -> None:
        with self._lock:
            node = self._nodes[node_id]
            text = result if isinstance(result, str) else None
            fields.setdefault("result_truncated", bool(text is not None and len(text) > TEXT_LIMIT))
            node.update(status=status, ended_at=_now(), error=_kept(error),
                        **{k: _kept(v) for k, v in fields.items()}, result=_kept(result))
            # usage rolls up the tree: an agent's total is its own calls plus its sub-agents' totals
            own = node["usage"].setdefault("own", dict.fromkeys(USAGE_KEYS, 0))
            total = dict(own)
            for child in (c for c in node["children"] if c["kind"] == "agent"):
                for key in USAGE_KEYS:
                    total[key] += child["usage"].get("total", {}).get(key, 0)
            total["cost_usd"] = round(total["cost_usd"], 6)
            node["usage"]["total"] = total
            node["duration_s"] = round(time.monotonic() - self._clock[node_id], 3)

    def update_node(self, node_id: str, **fields: Any) -> None:
        with self._lock:
            self._nodes[node_id].update({k: _kept(v) for k, v in fields.items()})

    def add_iteration(self, node_id: str, **data: Any) -> None:
        """Record one iteration of an agent and save the tree."""
        with self._lock:
            node = self._nodes[node_id]
            entry = {"index": len(node["iterations"]), **{k: _kept(v) for k, v in data.items()},
                     "children": self._spawned.pop(node_id, [])}
            node["iterations"].append(entry)
            own = node["usage"].setdefault("own", dict.fromkeys(USAGE_KEYS, 0))
            for key in USAGE_KEYS:
                own[key] += (data.get("usage") or {}).get(key, 0)
        self.save()

    # -- the run

    def count(self, key: str, n: int = 1) -> None:
        """Add to a run-level usage counter (atomic: parallel agents count sandboxes at once)."""
        with self._lock:
            self.run["usage"][key] += n

    def set_usage(self, usage: dict[str, Any]) -> None:
        with self._lock:
            self.run["usage"].update(usage)

    def finish(self, status: str, result: Any = None, error: Optional[str] = None) -> None:
        with self._lock:
            self.run.update(status=status, result=result, error=error, ended_at=_now(),
                            duration_s=round(time.time() - self.started, 3))
            root = self.run["root"]
            if root is not None and root["status"] == "running":  # the document engine's agent: its result is the run's
                self.end_node(root["id"], status, result=result, error=error)
        self.save()

    def save(self) -> None:
        """Rewrite run.json whole (valid UTF-8 whatever the model wrote); on a full disk the last good
        version stays and `records.DiskFull` is raised."""
        with self._lock:
            self.run["duration_s"] = round(time.time() - self.started, 3)
            data = self._serialized()
        write_atomic(self.path, data)

    def _serialized(self) -> str:
        """The record as JSON, cut to `max_record_mb` when it would exceed it (and `record_cut` says so)."""
        data = json.dumps(self.run, ensure_ascii=False, indent=1, default=str)
        if len(data) * 4 <= self.max_bytes or len(data.encode("utf-8", "replace")) <= self.max_bytes:
            return data
        before = len(data.encode("utf-8", "replace"))
        self.record_cut = {"limit_mb": self.max_bytes / 1024 / 1024, "bytes": before}
        room = self.max_bytes - 4096  # for the note and the indentation the cut copy adds back
        cut, _ = fit({**self.run, "record_cut": self.record_cut}, room)
        cut["record_cut"] = self.record_cut
        return json.dumps(cut, ensure_ascii=False, default=str)

    @property
    def agents(self) -> int:
        return sum(node["kind"] == "agent" for node in self._nodes.values())

    @property
    def iterations(self) -> int:
        return sum(len(node["iterations"]) for node in self._nodes.values())

    @property
    def max_depth(self) -> int:
        return max((node["depth"] for node in self._nodes.values() if node["kind"] == "agent"), default=0)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")
