"""Scripted policy for repo_todos: depth 0 splits by package, depth 1 by TODO, depth 2 judges one TODO.
It works on any git repository; its judgement is mechanical (shorter TODOs count as easier) and its "fix"
marks the chosen TODO as done: it exercises the machinery, not intelligence."""

from rlm_pipelines.models.scripted import DepthScript, Turn

ROOT = [
    Turn("files = sh('git ls-files').split()\n"
         "hits = [l for l in sh(\"git grep -n -I -E 'TODO|FIXME'\").splitlines() if l.count(':') >= 2]\n"
         "packages = sorted({h.split(':')[0].split('/')[0] for h in hits if '/' in h.split(':')[0]})\n"
         "loose = [h for h in hits if '/' not in h.split(':')[0]]\n"
         "print(len(files), 'files,', len(hits), 'TODOs; packages:', packages, '; top-level TODOs:', len(loose))",
         "Map the repository and where its TODOs are."),
    Turn("import json\n"
         "reports = rlm_query_batched([f'Investigate the TODO comments in package {p}/ of this repository. Judge '\n"
         "    'each: difficulty 1 (trivial) to 5 (hard) and why. Reply with JSON only: a list of objects with '\n"
         "    'file, line, todo, difficulty, reason.' for p in packages])\n"
         "todos = []\n"
         "for p, r in zip(packages, reports):\n"
         "    try:\n        todos.extend(json.loads(r))\n"
         "    except ValueError:\n        print('unparsed report for', p, ':', r[:300])\n"
         "print(len(todos), 'TODOs judged by', len(reports), 'sub-agents')",
         "One sub-agent per package, in parallel."),
    Turn("easiest = sorted(todos, key=lambda t: (t['difficulty'], t['file'], t['line']))[0]\n"
         "print(easiest)\n"
         "line_text = open(f\"/workspace/repo/{easiest['file']}\").read().splitlines()[easiest['line'] - 1]\n"
         "print(edit_file(easiest['file'], line_text, line_text.replace('TODO', 'DONE', 1).replace('FIXME', 'FIXED', 1)))\n"
         "print(sh('git diff --stat'))",
         "Fix the easiest one."),
    Turn("report = {'todos': todos, 'easiest': easiest, 'changed': sh('git diff --stat').strip()}\n"
         "FINAL_VAR('report')", "Report."),
]

PACKAGE = [
    Turn("import json, re\n"
         "pkg = re.search(r'package (\\S+?)/', task).group(1)\n"
         "hits = [l for l in sh(f\"git grep -n -I -E 'TODO|FIXME' -- {pkg}/\").splitlines() if l.count(':') >= 2]\n"
         "print(pkg, ':', len(hits), 'TODOs; checkout at', sh('git rev-parse HEAD').strip())",
         "Find this package's TODOs."),
    Turn("judged = rlm_query_batched([f\"Judge the TODO at {h.split(':')[0]} line {h.split(':')[1]}: \"\n"
         "    f\"{h.split(':', 2)[2].strip()} -- read the code around it and reply with JSON only: file, line, todo, \"\n"
         "    f'difficulty (1-5), reason.' for h in hits])\n"
         "rows = []\n"
         "for h, j in zip(hits, judged):\n"
         "    try:\n        rows.append(json.loads(j))\n"
         "    except ValueError:  # no sub-agent (depth or sandbox limit): judge it here\n"
         "        path, line, text = h.split(':', 2)\n"
         "        rows.append({'file': path, 'line': int(line), 'todo': text.strip(),\n"
         "                     'difficulty': min(5, 1 + len(text.split()) // 5), 'reason': 'judged in place: ' + j[:80]})\n"
         "FINAL(json.dumps(rows))",
         "One sub-agent per TODO."),
]

JUDGE = [
    Turn("import json, re\n"
         "m = re.search(r'TODO at (\\S+) line (\\d+): (.*?) -- read the code', task, re.S)\n"
         "path, line, todo = m.group(1), int(m.group(2)), m.group(3).strip()\n"
         "context = sh(f\"nl -ba {path} | sed -n '{max(1, line - 5)},{line + 5}p'\")\n"
         "print(context)\nprint('checkout at', sh('git rev-parse HEAD').strip())",
         "Read the code around the TODO."),
    Turn("words = len(todo.split())\n"
         "FINAL(json.dumps({'file': path, 'line': line, 'todo': todo, 'difficulty': min(5, 1 + words // 5),\n"
         "                  'reason': f'{words} words; {len(context.splitlines())} lines of context read'}))",
         "Judge it."),
]


def policy() -> DepthScript:
    return DepthScript({0: ROOT, 1: PACKAGE, 2: JUDGE})
