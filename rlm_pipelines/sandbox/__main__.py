"""`python -m rlm_pipelines.sandbox cleanup`: delete Daytona sandboxes a run left behind
(`cleanup --local`: local sandbox folders).

Every sandbox rlm-pipelines makes carries the label `rlm-pipelines=1` plus `rlm-run=<run id>` and
`rlm-task=<task>`. Runs delete their own sandboxes, also on errors and Ctrl-C, and ephemeral sandboxes
with a TTL end by themselves; this is for what a killed process (kill -9, a lost machine) left running,
which Daytona bills until its TTL. It deletes only sandboxes with our label, narrowed by the options.
With --local it removes local sandbox folders whose owner process is gone (see sandbox/owner.py).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlm_pipelines.sandbox",
                                     description="Commands for the sandboxes runs make.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    clean = commands.add_parser("cleanup", help="delete sandboxes a killed run left behind (Daytona; --local: local folders)",
                                description=__doc__.split("\n\n")[1])
    clean.add_argument("--run", help="only this run's sandboxes (the id in run.json)")
    clean.add_argument("--task", help="only sandboxes of this task")
    clean.add_argument("--older-than", type=float, default=0.0, metavar="MINUTES",
                       help="only sandboxes created at least this long ago (spare runs still going)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    clean.add_argument("--local", action="store_true",
                       help="local sandboxes instead: remove the folders (in the temp dir, or --root) whose "
                            "owner process is gone; a live run's are kept")
    clean.add_argument("--root", action="append", metavar="DIR",
                       help="with --local: where the sandbox folders are (sandbox.root_dir; default the temp dir)")
    clean.add_argument("--config", help="a sandbox config file to take the API settings from (default: the "
                                        "built-in sandbox/daytona.yaml)")
    return parser


def cleanup_local(args: argparse.Namespace) -> int:
    """Remove local sandbox folders a killed run left (its owner process is gone)."""
    from rlm_pipelines.sandbox.owner import orphans, remove

    found = [(f"{folder}  (owner pid {owner.get('pid')}, gone)", functools.partial(remove, folder))
             for base in args.root or [None] for folder, owner in orphans(base)]
    removed = _remove_each(found, "remove", "removed", args.dry_run, OSError)
    print(f"{len(found)} local sandbox folder(s) left by runs that are gone; {removed} removed", file=sys.stderr)
    return 0 if removed == len(found) or args.dry_run else 1


def _remove_each(found: list[tuple[str, Callable[[], object]]], verb: str, done: str, dry_run: bool,
                 errors: type[BaseException]) -> int:
    """Run each (description, remove) pair, saying what happened to each; how many were removed."""
    removed = 0
    for what, remove in found:
        if dry_run:
            print(f"would {verb} {what}")
            continue
        try:
            remove()
            removed += 1
            print(f"{done} {what}")
        except errors as exc:
            print(f"could not {verb} {what}: {exc}", file=sys.stderr)
    return removed


def cleanup(args: argparse.Namespace) -> int:
    if args.local:
        return cleanup_local(args)
    from omegaconf import OmegaConf

    from rlm_pipelines.config import DaytonaSandboxConfig
    from rlm_pipelines.paths import conf_dir
    from rlm_pipelines.sandbox.daytona import OWNER_LABEL, MissingDaytonaKey, list_sandboxes

    source = OmegaConf.load(args.config or conf_dir() / "sandbox" / "daytona.yaml")
    source.pop("defaults", None)  # the built-in yaml names its schema for Hydra; this is that schema
    config: DaytonaSandboxConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DaytonaSandboxConfig), source))  # type: ignore
    labels = {OWNER_LABEL: "1", **({"rlm-run": args.run} if args.run else {}),
              **({"rlm-task": args.task} if args.task else {})}
    try:
        matching = list_sandboxes(config.daytona, labels)
    except MissingDaytonaKey:
        variable = config.daytona.api_key_env
        print(f"error: cleanup lists and deletes sandboxes through the Daytona API, which needs your key in "
              f"${variable}: `export {variable}=...` (keys: https://app.daytona.io/dashboard/keys), or give "
              f"--config a sandbox config whose daytona.api_key_env names the variable that holds it",
              file=sys.stderr)
        return 2
    cutoff = datetime.now(timezone.utc) - timedelta(minutes=args.older_than)
    found = []
    for sandbox in matching:
        created = _when(getattr(sandbox, "created_at", None))
        if args.older_than and created is not None and created > cutoff:
            continue
        what = (f"{sandbox.id}  run={sandbox.labels.get('rlm-run', '?')} task={sandbox.labels.get('rlm-task', '?')} "
                f"agent={sandbox.labels.get('rlm-agent', '?')} state={getattr(sandbox, 'state', '?')}")
        found.append((what, functools.partial(sandbox.delete, timeout=60)))
    deleted = _remove_each(found, "delete", "deleted", args.dry_run, Exception)
    print(f"{len(found)} sandbox(es) matched {labels}; {deleted} deleted", file=sys.stderr)
    return 0 if deleted == len(found) or args.dry_run else 1


def _when(value: object) -> "datetime | None":
    if not value:
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def main(argv: "list[str] | None" = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    return cleanup(args)


if __name__ == "__main__":
    sys.exit(main())
