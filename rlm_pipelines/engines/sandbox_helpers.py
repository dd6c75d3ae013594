"""Helpers defined in every repo agent's REPL (this file's text runs there; stdlib only).

`sh` runs shell commands (grep, git, nl ...) in the checkout; `edit_file` makes exact, checked edits.
`REPO` (the checkout's path inside the sandbox) is set by the engine before this runs: the text cannot
import the project.
"""

import ast as _ast
import os as _os
import subprocess as _subprocess


def sh(command, timeout=60):
    """Run a shell command in the repo checkout; returns its stdout and stderr as one string."""
    done = _subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    return out if done.returncode == 0 else out + "[exit code %d]" % done.returncode


def edit_file(path, old, new, replace_all=False):
    """Replace `old` by `new` in `path` (relative to the repo). `old` must occur exactly once unless
    replace_all=True. An edit that would leave a .py file with a syntax error is refused."""
    full = path if _os.path.isabs(path) else _os.path.join(REPO, path)
    with open(full, encoding="utf-8") as handle:
        text = handle.read()
    count = text.count(old)
    if count == 0:
        raise ValueError("edit_file: the old text does not occur in %s" % path)
    if count > 1 and not replace_all:
        raise ValueError("edit_file: the old text occurs %d times in %s; give more context to make it unique, "
                         "or pass replace_all=True" % (count, path))
    updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    if full.endswith(".py"):
        try:
            _ast.parse(updated, filename=path)
        except SyntaxError as exc:
            raise SyntaxError("edit_file refused: %s would not parse after this edit (line %s: %s)"
                              % (path, exc.lineno, exc.msg)) from None
    # Write a new file and rename it over the old one: atomic, and it works on a checkout whose files are
    # shared read-only between agents.
    tmp = "%s.rlm-edit-%d" % (full, _os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(updated)
    _os.chmod(tmp, 0o644 | (_os.stat(full).st_mode & 0o111))
    _os.replace(tmp, full)
    return "edited %s: %d replacement(s)" % (path, count if replace_all else 1)
