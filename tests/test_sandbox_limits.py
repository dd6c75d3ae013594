"""Sandbox-wide limits of the local sandbox (memory, disk, user namespaces, uploads, its Python), each attack
performed for real in bubblewrap: the host stays fine and the run goes on with a notice."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import cli
from rlm_pipelines.config import LocalSandboxConfig
from rlm_pipelines.sandbox import SandboxConfigError, SandboxError
from rlm_pipelines.sandbox.local import LocalSandbox, _bwrap_problem

pytestmark = [pytest.mark.skipif(_bwrap_problem() is not None, reason=f"bubblewrap unusable: {_bwrap_problem()}"),
              pytest.mark.skipif(os.geteuid() != 0, reason="measures the sandbox by its own uid (root hosts)")]
PROJECT = Path(__file__).resolve().parent.parent


def rss_of_uid(uid):
    """Resident bytes of every process of `uid`, read by the test itself from /proc."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    for line in Path(f"/proc/{entry.name}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except (OSError, ValueError):
                pass
    return total


def disk_bytes(*folders):
    """Bytes the files under these host folders take on disk, each inode once."""
    seen, total = set(), 0
    for top in folders:
        for folder, _, names in os.walk(top):
            for name in names:
                info = os.lstat(os.path.join(folder, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def available_memory():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024


class Sampler:
    """Samples a measure on a thread every 10 ms while the `with` block runs; keeps the peak and low."""

    def __init__(self, measure):
        self.measure, self.peak, self.low = measure, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            value = self.measure()
            self.peak = max(self.peak, value)
            self.low = value if self.low is None else min(self.low, value)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# Four processes growing to 600 MB each, 10 MB per 50 ms: 2.4 GB together.
MEMORY_BOMB = (
    "import subprocess\n"
    "grow = 'import time\\nheld = []\\nfor _ in range(60):\\n    held.append(bytearray(10 << 20)); time.sleep(0.05)\\n"
    "time.sleep(60)'\n"
    "hogs = [subprocess.Popen(['python3', '-c', grow]) for _ in range(4)]\n"
    "print([hog.wait() for hog in hogs])\n")


def test_many_processes_together_stay_inside_memory_mb_and_the_repl_goes_on(capsys):
    box = LocalSandbox(LocalSandboxConfig(isolation="bwrap", memory_mb=1024))
    with box:
        repl = box.open_repl()
        before = available_memory()
        with Sampler(lambda: rss_of_uid(box._uid)) as sandbox_rss, Sampler(available_memory) as host:
            result = repl.execute(MEMORY_BOMB, timeout_s=60)
        assert result.error is not None, result.output()
        assert "the sandbox went over its memory limit (1024 MB" in result.error.message
        assert "processes were stopped" in result.error.message
        following = repl.execute("print(6 * 7)")
        assert following.stdout == "42\n"
        assert "over its memory limit (1024 MB" in following.notice
        with capsys.disabled():
            print(f"\n[memory bomb] sandbox peak RSS {sandbox_rss.peak >> 20} MB (limit 1024 MB, bomb 2400 MB); "
                  f"host available memory fell by at most {(before - host.low) >> 20} MB")
        assert sandbox_rss.peak < 1536 << 20  # the limit plus what grows in one check, far from 2.4 GB
        assert before - host.low < 1536 << 20


# Three processes, each writing a 100 MB file (one in /tmp), 4 MB at a time: 300 MB with disk_mb=200.
DISK_BOMB = (
    "import subprocess\n"
    "write = 'import sys, time\\nwith open(sys.argv[1], \"wb\") as out:\\n    for _ in range(25):\\n"
    "        out.write(bytes(4 << 20)); out.flush(); time.sleep(0.02)\\ntime.sleep(60)'\n"
    "writers = [subprocess.Popen(['python3', '-c', write, path]) for path in ('a.bin', 'b.bin', '/tmp/c.bin')]\n"
    "print([writer.wait() for writer in writers])\n")


def test_many_files_together_stay_inside_disk_mb_and_the_repl_goes_on(capsys):
    box = LocalSandbox(LocalSandboxConfig(isolation="bwrap", disk_mb=200))
    with box:
        repl = box.open_repl()
        folders = (box.root / "workspace", box.root / "tmp")
        with Sampler(lambda: disk_bytes(*folders)) as disk:
            result = repl.execute(DISK_BOMB, timeout_s=60)
        assert result.error is not None, result.output()
        assert "the sandbox went over its disk limit (200 MB" in result.error.message
        after = disk_bytes(*folders)
        with capsys.disabled():
            print(f"\n[disk bomb] bytes on the host disk: peak {disk.peak >> 20} MB, after {after >> 20} MB "
                  f"(limit 200 MB, bomb 300 MB)")
        assert after <= 200 << 20
        following = repl.execute("import os; print(sorted(os.listdir('.')))")
        assert following.error is None, following.output()
        assert "files written last were removed" in following.notice
        assert box.run("echo more > /tmp/small; cat /tmp/small")[1] == "more\n"  # the sandbox goes on


def test_no_user_namespace_and_no_mount_inside(tmp_path):
    with LocalSandbox(LocalSandboxConfig(isolation="bwrap", memory_mb=256)) as box:
        code, out = box.run("unshare -Urm true")
        assert code != 0, out
        code, out = box.run("unshare -Ur sh -c 'mount -t tmpfs -o size=3g none /tmp && echo mounted'")
        assert code != 0 and "mounted" not in out, out
        code, out = box.run("mkdir -p m && mount -t tmpfs none m && echo mounted")
        assert code != 0 and "mounted" not in out, out
        # the shared-memory tmpfs is capped by memory_mb too
        code, out = box.run(["python3", "-c", "import os; s = os.statvfs('/dev/shm'); print(s.f_blocks * s.f_frsize)"])
        assert code == 0 and int(out) <= 256 << 20, out


# Swaps the parent folder `d` and the target `d/f` for symlinks to host paths, as fast as it can.
SWAPPER = """
import os, shutil, sys, time
victim_dir, victim_file = sys.argv[1], sys.argv[2]
end = time.time() + 60
while time.time() < end:
    try:
        if os.path.islink("d"):
            os.unlink("d")
        os.makedirs("d", exist_ok=True)
        if os.path.lexists("d/f.tmp"):
            os.unlink("d/f.tmp")
        os.symlink(victim_file, "d/f.tmp")
        os.replace("d/f.tmp", "d/f")
        shutil.rmtree("real", ignore_errors=True)
        os.rename("d", "real")
        os.symlink(victim_dir, "d")
    except OSError:
        pass
"""


def test_upload_never_changes_a_host_files_owner(tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim_file = victim_dir / "f"
    victim_file.write_text("host data")
    before = [(path.stat().st_uid, path.stat().st_gid) for path in (victim_dir, victim_file)]
    with LocalSandbox(LocalSandboxConfig(isolation="bwrap")) as box:
        box.upload("swap.py", SWAPPER.encode())
        swapper = threading.Thread(target=box.run, args=(["python3", "swap.py", str(victim_dir), str(victim_file)],),
                                   kwargs={"timeout": 60}, daemon=True)
        swapper.start()
        time.sleep(0.3)
        refused = 0
        for attempt in range(200):
            try:
                box.upload("d/f", f"upload {attempt}".encode())
            except (SandboxError, OSError):
                refused += 1
            now = [(path.stat().st_uid, path.stat().st_gid) for path in (victim_dir, victim_file)]
            assert now == before, f"a host file changed owner at attempt {attempt}"
    assert victim_file.read_text() == "host data"
    assert refused < 200  # some uploads went through: the race was really run


def test_a_python_under_tmp_runs_the_repl(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project.pth").write_text("\n".join(p for p in sys.path if p) + "\n")
    script = ("from rlm_pipelines.config import LocalSandboxConfig\n"
              "from rlm_pipelines.sandbox.local import LocalSandbox\n"
              "with LocalSandbox(LocalSandboxConfig(isolation='bwrap')) as box:\n"
              "    print(box.open_repl().execute('import sys; print(sys.prefix)').output())\n")
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(venv)


def test_a_missing_python_fails_at_once_and_is_never_retried(tmp_path):
    with pytest.raises(SandboxConfigError, match="/nonexistent/python3"):
        LocalSandbox(LocalSandboxConfig(isolation="bwrap", python="/nonexistent/python3")).start()
    done = cli(["task=monte_cristo", "model=scripted", "orchestration.prefect=false",
                "sandbox.python=/nonexistent/python3"], cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    assert "/nonexistent/python3" in done.stdout + done.stderr
    assert "retrying" not in (done.stdout + done.stderr).lower()
