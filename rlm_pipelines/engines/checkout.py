"""Repo checkouts for the repo engine: one mirror per repo URL, cloned once and fetched once per run.

The root agent's fresh checkout is a `git clone --shared` of the mirror made inside its own sandbox (the
mirror is mounted read-only): objects are not copied, only the working tree is written. Sub-agents, where
the sandbox supports it, get a hardlinked copy of one base checkout made once per run: milliseconds
whatever the repo's size; never the network."""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from rlm_pipelines import redact
from rlm_pipelines.paths import cache_dir
from rlm_pipelines.sandbox.base import REPO_DIR, DownloadTooLarge

MIRROR_IN_SANDBOX = "/mirror"  # where agents see the mirror (read-only)


class CheckoutError(ValueError):
    """The repo, branch or commit cannot be had; the message says which and what to do."""


def _git(*args: str, cwd: Optional[Path] = None, input_: Optional[bytes] = None,
         timeout: float = 600, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run git on the host, never prompting; `env` adds to the environment (e.g. `redact.git_auth_env`)."""
    full = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", **(env or {})}
    return subprocess.run(["git", *args], cwd=cwd, input=input_, capture_output=True, timeout=timeout, env=full)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two runs on one repo share the mirror, one fetch at a time
        yield


def prepare_mirror(repo: str, branch: Optional[str], commit: Optional[str]) -> tuple[Path, str]:
    """(the mirror's path, the commit every agent checks out). Clones or fetches the mirror first."""
    local = _local_repo(repo)
    source = str(local) if local is not None else redact.remember(repo)  # the mirror's config: no credential
    auth, repo = redact.git_auth_env(source), redact.text(repo)  # messages below name the clean URL
    mirror = cache_dir("mirrors") / (hashlib.sha1(source.encode()).hexdigest()[:16] + ".git")
    with _locked(mirror):
        if (mirror / "HEAD").is_file():
            done = _git("fetch", "--prune", "--quiet", "origin", cwd=mirror, env=auth)
            if done.returncode != 0:  # a stale mirror still serves known commits; say so but go on
                print(f"warning: could not update the mirror of {repo}: {done.stderr.decode().strip()}")
        else:
            tmp = mirror.with_name(mirror.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            done = _git("clone", "--mirror", "--quiet", "--", source, str(tmp), env=auth)
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


def clone_url(repo: str, mirror: Path) -> str:
    """`task.repo` as a URL for a sandbox provider: URLs as given, local paths as file:// URLs (which no
    cloud provider can reach: DaytonaSandbox uploads those instead, see its `checkout` option). A repo that
    needs a credential is the host's mirror as a file:// URL too: the credential never enters a sandbox."""
    local = _local_repo(repo)
    if local is not None:
        return local.as_uri()
    clean = redact.remember(repo)
    return mirror.as_uri() if redact.has_credential(clean) else clean


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


# Host-side git over a folder sandbox code wrote: only our own config counts (no hooks, fsmonitor, external
# diff or textconv, attributes' drivers undefined), and git never looks at the checkout's own .git.
SAFE_GIT = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false",
            "-c", "core.symlinks=true", "-c", "core.autocrlf=false", "-c", "core.safecrlf=false",
            "-c", "diff.external=", "-c", "core.bigFileThreshold=16m", "-c", "gc.auto=0")


def host_patch(mirror: Path, work_tree: Path, commit: str, max_bytes: int, deadline: float,
               parent: Optional[str] = None) -> bytes:
    """The changes in `work_tree` (a checkout of `commit` whose sandbox is stopped) as a binary-safe diff,
    new files included, made on the host with a git folder of our own (objects from the mirror); what the
    checkout's own .git says is never read. `DownloadTooLarge` over `max_bytes`, `TimeoutError` at `deadline`."""
    with tempfile.TemporaryDirectory(prefix="rlm-patch-", dir=parent) as tmp:
        git_dir = Path(tmp) / "git"
        own = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_OPTIONAL_LOCKS": "0"}
        env = {**own, "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(work_tree),
               "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        steps = ((Path(tmp), own, ("init", "--quiet", "--bare", "--template=", str(git_dir))),
                 (work_tree, env, ("read-tree", commit)), (work_tree, env, ("add", "-A", ".")))
        for cwd, step_env, args in steps:
            done = _git(*SAFE_GIT, *args, cwd=cwd, env=step_env, timeout=max(1.0, deadline - time.monotonic()))
            if done.returncode != 0:
                raise CheckoutError(f"could not make the patch: {done.stderr.decode(errors='replace').strip()[-500:]}")
            if args[0] == "init":
                (git_dir / "objects" / "info").mkdir(parents=True, exist_ok=True)
                (git_dir / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
        diff = ("diff", "--cached", "--binary", "--no-ext-diff", "--no-textconv", "--no-color", commit, "--")
        return _bounded_output(["git", *SAFE_GIT, *diff], work_tree, env, max_bytes, deadline)


def _bounded_output(argv: list[str], cwd: Path, env: dict[str, str], max_bytes: int, deadline: float) -> bytes:
    """A command's stdout, read as it comes: the command is killed at `max_bytes` or at `deadline`."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errors)
        chunks, size = [], 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("making the patch ran past the run's deadline")
                if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
                    continue
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadTooLarge("the patch", max_bytes)
                chunks.append(chunk)
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise TimeoutError("making the patch ran past the run's deadline") from exc
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if proc.returncode != 0:
            errors.seek(0)
            raise CheckoutError(f"could not make the patch: {errors.read()[-500:].decode(errors='replace').strip()}")
        return b"".join(chunks)
