"""repo_audit: a findings report (file, line, kind, severity, evidence) and an optional patch; meant for
scheduled runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlm_pipelines.models.scripted import DepthScript, Turn
from rlm_pipelines.tasks import RepoParams, RepoTask

DEFAULT_PROMPT = (
    "Audit this repository for problems worth a maintainer's attention: bugs, risky code (eval/exec, shell "
    "injection, bare except, hard-coded secrets), and open TODO/FIXME debt. Split the work by top-level "
    "package with sub-agents (rlm_query_batched). End with FINAL_VAR of a dict with `findings`: a list of "
    "{file, line, kind, severity (low|medium|high), evidence (the offending line)}. Fix nothing unless a fix "
    "is trivial and certain.")

# The scripted policy's checks: (kind, severity, git grep -E pattern)
CHECKS = [("todo", "low", "TODO|FIXME"), ("bare-except", "medium", "except[[:space:]]*:"),
          ("eval", "high", "(^|[^.a-z_])(eval|exec)\\("), ("shell", "high", "shell=True")]


@dataclass
class RepoAuditParams(RepoParams):
    prompt: str = DEFAULT_PROMPT


class RepoAudit(RepoTask):
    name = "repo_audit"
    params = RepoAuditParams

    def downstream(self, result: dict[str, Any], inputs: dict[str, Any], params: RepoAuditParams,
                   run_dir: Path, model: str = "") -> list[str]:
        comparison = compare(result.get("findings") or [], previous_audit(run_dir, params), _partial(run_dir))
        (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=1))
        return ["comparison.json"]

    def summary(self, result: dict[str, Any], params: RepoAuditParams, run_dir: Path) -> dict[str, Any]:
        path = run_dir / "comparison.json"
        return {"comparison": json.loads(path.read_text())} if path.is_file() else {}

    def script(self, params: RepoAuditParams) -> Any:
        checks = json.dumps(CHECKS)
        root = [
            Turn("hits = sh('git ls-files').split()\n"
                 "packages = sorted({f.split('/')[0] for f in hits if '/' in f})\n"
                 "print(len(hits), 'files; packages:', packages)", "Map the repository."),
            Turn("import json\n"
                 "parts = rlm_query_batched([f'Audit package {p}/ and reply with JSON only: a list of findings '\n"
                 "                           '{file, line, kind, severity, evidence}.' for p in packages])\n"
                 "findings = []\n"
                 "for p, part in zip(packages, parts):\n"
                 "    try:\n        findings.extend(json.loads(part))\n"
                 "    except ValueError:\n        print('unparsed audit of', p, ':', part[:200])\n"
                 "report = {'findings': sorted(findings, key=lambda f: (f['file'], f['line'], f['kind']))}\n"
                 "print(len(findings), 'findings')", "One auditor per package."),
            Turn("FINAL_VAR('report')", "Report."),
        ]
        package = [
            Turn("import json, re\n"
                 "pkg = re.search(r'package (\\S+?)/', task).group(1)\n"
                 f"CHECKS = {checks}\n"
                 "found = []\n"
                 "for kind, severity, pattern in CHECKS:\n"
                 "    for hit in sh(f\"git grep -n -I -E '{pattern}' -- {pkg}/\").splitlines():\n"
                 "        if hit.count(':') >= 2 and not hit.startswith('[exit'):\n"
                 "            path, line, text = hit.split(':', 2)\n"
                 "            found.append({'file': path, 'line': int(line), 'kind': kind, 'severity': severity,\n"
                 "                          'evidence': text.strip()[:200]})\n"
                 "FINAL(json.dumps(found))", "Run the checks on this package."),
        ]
        return DepthScript({0: root, 1: package})


def _key(finding: dict[str, Any]) -> tuple:
    # line numbers move as code changes above a finding; file, kind and the offending line identify it
    return finding.get("file"), finding.get("kind"), " ".join(str(finding.get("evidence", "")).split())


def _partial(run_dir: Path) -> Optional[dict[str, Any]]:
    """Why this run's audit may be incomplete (run.json's `partial`, recorded before downstream steps)."""
    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("partial")
    except (OSError, ValueError):
        return None


def previous_audit(run_dir: Path, params: RepoAuditParams) -> Optional[Path]:
    """The latest complete audit (status ok: a partial one is never a baseline) of the same repo and branch
    before this run (its run folder)."""
    runs_root = run_dir.parent.parent  # run_dir is outputs/runs/repo_audit/<date>/<time>_<model>
    candidates = []
    for summary_file in runs_root.glob("*/*/summary.json"):
        folder = summary_file.parent
        if folder == run_dir:
            continue
        try:
            summary = json.loads(summary_file.read_text())
            run = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError):
            continue
        complete = summary.get("status") == "ok" and not run.get("partial")
        if complete and run.get("repo") == params.repo and run.get("branch") == params.branch:
            candidates.append((run.get("started_at", ""), folder))
    return max(candidates)[1] if candidates else None


def compare(findings: list[dict[str, Any]], previous: Optional[Path],
            partial: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """New, still-open and resolved findings against the previous audit (all new when there is none). When
    this audit is `partial` (agents refused or cut), a finding it did not see may simply not have been looked
    at: it is `not_compared`, never `resolved`."""
    before = json.loads((previous / "result.json").read_text()).get("findings", []) if previous else []
    old, now = {_key(f): f for f in before}, {_key(f): f for f in findings}
    gone = [f for k, f in old.items() if k not in now]
    return {"against": str(previous) if previous else None, "complete": not partial,
            "new": [f for k, f in now.items() if k not in old],
            "still_open": [f for k, f in now.items() if k in old],
            "resolved": [] if partial else gone, "not_compared": gone if partial else []}


task = RepoAudit()
