"""Issue 11, points 1, 2 and 9 on the host side: a REPL server that sends too much, sends what the host did
not ask for, or sends lone surrogates cannot hurt the host.

The hostile frames come from a real hostile server (`tests/fakes/hostile_repl.py`) through the REAL
transports (a subprocess on pipes, a local HTTP server), not from cell code: cell code cannot reach the
channel. The host runs in a child process (`tests/fakes/repl_host.py`) that reports its own peak RSS; the
bound asserted is generous: before frames were bounded, the same attacks took the host to gigabytes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_pipelines.config import ReplConfig
from rlm_pipelines.repl.session import ReplSession
from tests.fakes.repl_host import stdio_spawn

PROJECT = Path(__file__).resolve().parent.parent
SETTING = "sandbox.repl.max_message_mb"
PEAK_MB = 300


def host(mode, limit_mb, *cells):
    """Run `cells` in a ReplSession in a child process; its results and peak RSS (MB)."""
    done = subprocess.run([sys.executable, "-m", "tests.fakes.repl_host", mode, str(limit_mb), *cells],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    return report["cells"], report["peak_rss_mb"]


@pytest.mark.parametrize("mode", ["stdio", "http"])
def test_an_endless_frame_stops_the_repl_and_the_host_stays_small(mode):
    """1.5 GB with no end (a line without a newline; a poll body that never ends) is refused as it
    streams, the cell says why and which setting, and the next cell runs in a fresh REPL."""
    (attacked, after), peak = host(mode, 8, "long-line", "ok")
    assert attacked["error"].startswith("ReplDied: the REPL server broke the protocol")
    assert SETTING in attacked["error"]
    assert after["stdout"] == "REAL" and after["error"] is None
    assert "The REPL was restarted" in after["notice"] and SETTING in after["notice"]
    assert peak < PEAK_MB, f"host peak RSS {peak} MB"


def test_frames_the_host_did_not_ask_for_are_ignored():
    """Results for ids never issued (`true` for 1, an unknown id, a list), a second hello and a duplicate
    result change nothing: the cell gets its own result and the REPL lives on."""
    (forged, after), _ = host("stdio", 8, "forged", "ok")
    assert forged["stdout"] == "REAL" and forged["error"] is None
    assert after["stdout"] == "REAL" and after["notice"] == ""


def test_lone_surrogates_from_the_sandbox_arrive_as_replacement_characters():
    (cell,), _ = host("stdio", 8, "surrogate")
    assert cell["stdout"] == "a\ufffdb"
    assert cell["final"] == {"kind": "final", "value": "\ufffd"}


@pytest.mark.parametrize("mode", ["stdio", "http"])
def test_text_sent_to_the_sandbox_cannot_fail_on_lone_surrogates(mode):
    """Cell code and inputs holding lone surrogates are sent (as U+FFFD) over both transports."""
    (cell,), _ = host(mode, 8, "py:'echo:\\ud800'")
    assert cell["stdout"] == "echo:\ufffd" and cell["error"] is None


def test_an_exit_message_ends_the_repl_with_its_reason():
    (died, after), _ = host("stdio", 8, "die", "ok")
    assert died["error"].startswith("ReplDied: the REPL server stopped: the cell's result is 9 MB")
    assert after["stdout"] == "REAL" and "The REPL was restarted" in after["notice"]


def test_oversize_and_malformed_host_calls_are_answered_with_errors():
    """Arguments over the limit (inside the frame's slack) and a result over it are refused with errors
    naming the setting; a lone surrogate returned by a host function arrives as U+FFFD."""
    (cell,), peak = host("stdio", 1, "calls")
    replies = json.loads(cell["stdout"])
    assert SETTING in replies["1"]["error"] and "the arguments of echo()" in replies["1"]["error"]
    assert SETTING in replies["2"]["error"] and "the result of big()" in replies["2"]["error"]
    assert replies["3"] == {"type": "reply", "call_id": 3, "value": "a\ufffdb"}
    assert "a list of arguments" in replies["4"]["error"]
    assert peak < PEAK_MB


def test_host_calls_held_at_once_are_bounded():
    """100 calls at once to a slow host function with 2 host workers: 8 are held (queued or running),
    the others are told at once why not, instead of piling up on the host."""
    (cell,), _ = host("stdio", 8, "flood")
    counts = json.loads(cell["stdout"])
    assert counts["values"] == 8 and counts["errors"] == 92
    assert "too many host calls at once" in counts["first_error"][0]


def test_in_a_real_sandbox_a_huge_llm_query_and_a_lone_surrogate():
    """Real bubblewrap, the real REPL server: llm_query('x' * 400_000_000) gives the cell an error naming
    the setting (refused in the sandbox, or the frame refused by the host and the REPL restarted) with the
    host's memory bounded; a host function returning a lone surrogate gives the cell U+FFFD at once, and so
    do inputs holding one."""
    (attacked, after, surrogate, inputs), peak = host(
        "bwrap", 8, "x = llm_query('x' * 400_000_000)", "print('alive')", "print(ascii(surr()))",
        "print(ascii(doc), ascii(large[:2]), len(large))")
    assert SETTING in attacked["output"]
    assert after["stdout"] == "alive\n"
    assert surrogate["stdout"] == "'a\\ufffdb'\n" and surrogate["error"] is None
    assert inputs["stdout"] == "'a\\ufffdb' '\\ufffdx' 70001\n"  # inputs: in the message and as a file
    assert peak < PEAK_MB, f"host peak RSS {peak} MB"


def test_a_server_that_stops_reading_cannot_hang_the_host():
    """A 1 MB reply to a server that never reads its channel again: the send gives up (after 2 s here),
    the REPL is stopped and the next cell runs in a fresh one (before: the cell's interrupt waited behind
    the blocked reply for ever)."""
    (deaf, after), _ = host("stdio", 8, "deaf", "ok")
    assert "read nothing of its channel" in deaf["error"]
    assert after["stdout"] == "REAL" and "The REPL was restarted" in after["notice"]


def test_cell_code_over_the_limit_is_refused_before_it_is_sent():
    with ReplSession(stdio_spawn(1), ReplConfig(max_message_mb=1)) as session:
        result = session.execute("echo:" + "x" * (2 << 20))
        assert result.error.type == "ValueError" and SETTING in result.error.message
        assert session.execute("ok").stdout == "REAL" and session.alive
