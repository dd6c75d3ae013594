"""repo_audit: a findings report (file, line, kind, severity, evidence) and an optional patch; meant for
scheduled runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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
    name: str = "repo_audit"
    prompt: str = DEFAULT_PROMPT


class RepoAudit(RepoTask):
    name = "repo_audit"
    params = RepoAuditParams

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


task = RepoAudit()
