"""Repo checkouts for the repo engine: one mirror per repo URL, cloned once and fetched once per run.

The root agent's fresh checkout is a `git clone --shared` of the mirror made inside its own sandbox (the
mirror is mounted read-only): objects are not copied, only the working tree is written. Sub-agents, where
the sandbox supports it, get a hardlinked copy of one base checkout made once per run: milliseconds
whatever the repo's size; never the network."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from rlm_pipelines.paths import cache_dir
from rlm_pipelines.sandbox.base import REPO_DIR

MIRROR_IN_SANDBOX = "/mirror"  # where agents see the mirror (read-only)


class CheckoutError(ValueError):
    """The repo, branch or commit cannot be had; the message says which and what to do."""


def _git(*args: str, cwd: Optional[Path] = None, input_: Optional[bytes] = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    return subprocess.run(["git", *args], cwd=cwd, input=input_, capture_output=True, timeout=timeout, env=env)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two runs on one repo share the mirror, one fetch at a time
        yield


def prepare_mirror(repo: str, branch: Optional[str], commit: Optional[str]) -> tuple[Path, str]:
    """(the mirror's path, the commit every agent checks out). Clones or fetches the mirror first."""
    local = _local_repo(repo)
    source = str(local) if local is not None else repo
    mirror = cache_dir("mirrors") / (hashlib.sha1(source.encode()).hexdigest()[:16] + ".git")
    with _locked(mirror):
        if (mirror / "HEAD").is_file():
            done = _git("fetch", "--prune", "--quiet", "origin", cwd=mirror)
            if done.returncode != 0:  # a stale mirror still serves known commits; say so but go on
                print(f"warning: could not update the mirror of {repo}: {done.stderr.decode().strip()}")
        else:
            tmp = mirror.with_name(mirror.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            done = _git("clone", "--mirror", "--quiet", source, str(tmp))
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckoutError(f"cannot clone task.repo={repo!r}: {done.stderr.decode().strip()} - give a git "
                                    f"URL or the path of a local git repository")
            tmp.rename(mirror)
    if commit:
        ref, what = f"{commit}^{{commit}}", f"task.commit={commit!r}"
    elif branch:
        ref, what = f"refs/heads/{branch}^{{commit}}", f"task.branch={branch!r}"
    else:
        ref, what = "HEAD^{commit}", "the default branch"
    done = _git("rev-parse", "--verify", "--quiet", ref, cwd=mirror)
    if done.returncode != 0:
        branches = _git("for-each-ref", "--format=%(refname:short)", "refs/heads", cwd=mirror).stdout.decode().split()
        raise CheckoutError(f"{what} is not in {repo!r} (branches: {', '.join(branches[:20]) or 'none'})")
    return mirror, done.stdout.decode().strip()


def _local_repo(repo: str) -> Optional[Path]:
    """`task.repo` as an absolute path when it names a folder on this machine, else None (a URL)."""
    path = Path(repo).expanduser()
    return path.resolve() if path.exists() else None


def clone_url(repo: str) -> str:
    """`task.repo` as a URL for a sandbox provider: URLs as given, local paths as file:// URLs (which no
    cloud provider can reach: DaytonaSandbox uploads those instead, see its `checkout` option)."""
    local = _local_repo(repo)
    return local.as_uri() if local is not None else repo


def checkout_command(commit: str) -> str:
    """Shell command run inside an agent's sandbox to make its fresh checkout at `commit`."""
    # Writing the working tree is the cost (objects come from the mirror); parallel checkout halves it.
    return (f"git clone --quiet --shared --no-checkout {MIRROR_IN_SANDBOX} {REPO_DIR} && "
            f"cd {REPO_DIR} && git -c checkout.workers=0 -c checkout.thresholdForParallelism=100 "
            f"checkout --quiet --detach {commit}")


def patch_applies(mirror: Path, commit: str, patch: bytes) -> tuple[bool, str]:
    """Check a patch with `git apply --check` on a fresh checkout of `commit` (a temp dir, removed)."""
    with tempfile.TemporaryDirectory(prefix="rlm-patch-check-") as tmp:
        work = Path(tmp) / "repo"
        for args in (("clone", "--quiet", "--shared", "--no-checkout", str(mirror), str(work)),
                     ("-C", str(work), "checkout", "--quiet", "--detach", commit)):
            done = _git(*args)
            if done.returncode != 0:
                return False, done.stderr.decode().strip()
        done = _git("apply", "--check", "--whitespace=nowarn", "-", cwd=work, input_=patch)
        return done.returncode == 0, done.stderr.decode().strip()


def make_bundle(mirror: Path, parent: Optional[str] = None) -> Path:
    """The mirror as one git bundle file (every branch and tag), for sandboxes that cannot reach the repo
    (see DaytonaSandbox.clone); they clone from it and check out the run's commit."""
    folder = Path(tempfile.mkdtemp(prefix="rlm-bundle-", dir=parent))
    done = _git("bundle", "create", str(folder / "repo.bundle"), "--all", cwd=mirror)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise CheckoutError(f"cannot bundle the repo for upload: {done.stderr.decode().strip()}")
    return folder / "repo.bundle"


def make_base(mirror: Path, commit: str, parent: Optional[str] = None) -> Path:
    """One checkout of `commit` on the host, which sub-agents' checkouts are hardlinked from (see
    LocalSandbox.seed). Its objects come from the mirror, at the path agents see it."""
    folder = Path(tempfile.mkdtemp(prefix="rlm-base-", dir=parent)) / "repo"
    for args in (("clone", "--quiet", "--shared", "--no-checkout", str(mirror), str(folder)),
                 ("-C", str(folder), "-c", "checkout.workers=0", "checkout", "--quiet", "--detach", commit)):
        done = _git(*args)
        if done.returncode != 0:
            shutil.rmtree(folder.parent, ignore_errors=True)
            raise CheckoutError(f"cannot check out {commit[:12]}: {done.stderr.decode().strip()}")
    (folder / ".git" / "objects" / "info" / "alternates").write_text(f"{MIRROR_IN_SANDBOX}/objects\n")
    return folder
