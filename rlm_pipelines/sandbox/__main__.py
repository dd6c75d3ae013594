"""`python -m rlm_pipelines.sandbox cleanup`: delete Daytona sandboxes a run left behind.

Every sandbox rlm-pipelines makes carries the label `rlm-pipelines=1` plus `rlm-run=<run id>` and
`rlm-task=<task>`. Runs delete their own sandboxes, also on errors and Ctrl-C, and ephemeral sandboxes
with a TTL end by themselves; this is for what a killed process (kill -9, a lost machine) left running,
which Daytona bills until its TTL. It deletes only sandboxes with our label, narrowed by the options.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent.parent / "conf" / "sandbox" / "daytona.yaml"


def cleanup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlm_pipelines.sandbox cleanup", description=__doc__.split("\n\n")[1])
    parser.add_argument("--run", help="only this run's sandboxes (the id in run.json)")
    parser.add_argument("--task", help="only sandboxes of this task")
    parser.add_argument("--older-than", type=float, default=0.0, metavar="MINUTES",
                        help="only sandboxes created at least this long ago (spare runs still going)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    parser.add_argument("--config", default=str(CONF), help="the sandbox config to take the API settings from")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf

    from rlm_pipelines.config import SandboxConfig
    from rlm_pipelines.sandbox.daytona import OWNER_LABEL, MissingDaytonaKey, client

    config: SandboxConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SandboxConfig),
                                                                OmegaConf.load(args.config)))  # type: ignore
    try:
        daytona = client(config.daytona)
    except MissingDaytonaKey as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from daytona import ListSandboxesQuery

    labels = {OWNER_LABEL: "1", **({"rlm-run": args.run} if args.run else {}),
              **({"rlm-task": args.task} if args.task else {})}
    cutoff = datetime.now(timezone.utc) - timedelta(minutes=args.older_than)
    found = deleted = 0
    for sandbox in daytona.list(ListSandboxesQuery(labels=labels)):
        created = _when(getattr(sandbox, "created_at", None))
        if args.older_than and created is not None and created > cutoff:
            continue
        found += 1
        what = (f"{sandbox.id}  run={sandbox.labels.get('rlm-run', '?')} task={sandbox.labels.get('rlm-task', '?')} "
                f"agent={sandbox.labels.get('rlm-agent', '?')} state={getattr(sandbox, 'state', '?')}")
        if args.dry_run:
            print(f"would delete {what}")
            continue
        try:
            sandbox.delete(timeout=60)
            deleted += 1
            print(f"deleted {what}")
        except Exception as exc:
            print(f"could not delete {what}: {exc}", file=sys.stderr)
    print(f"{found} sandbox(es) matched {labels}; {deleted} deleted", file=sys.stderr)
    return 0 if deleted == found or args.dry_run else 1


def _when(value: object) -> "datetime | None":
    if not value:
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def main(argv: "list[str] | None" = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "cleanup":
        print("usage: python -m rlm_pipelines.sandbox cleanup [--run ID] [--task NAME] [--older-than MINUTES] "
              "[--dry-run]", file=sys.stderr)
        return 2
    return cleanup(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
