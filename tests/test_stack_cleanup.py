"""The local stack's services die with the process that started them, even when it is killed
outright (SIGKILL: no ``close``, no signal handler), so a killed demo or test leaves nothing
running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = r"""
import json, sys, time
from serve_journal.examples.stack import LocalStack
stack = LocalStack(sys.argv[1])
stack.start_kafka("journal", 1)
proc, _ = stack._spawn("sleeper", ["sleep", "300"])
print(json.dumps(stack.pids()), flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _stat(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read()[:200]
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_services_die_with_a_killed_stack(tmp_path):
    err = tmp_path / "child.err"
    with open(err, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, start_new_session=True)
    pids: dict[str, int] = {}
    try:
        line = child.stdout.readline()
        assert line, f"the stack did not start (exit {child.wait(timeout=30)}): {err.read_text()[-3000:]}"
        pids = json.loads(line)
        assert set(pids) == {"kafka", "sleeper"} and all(_alive(p) for p in pids.values()), pids
        child.kill()  # SIGKILL: the stack gets no chance to stop anything itself
        child.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = {name: _stat(p) for name, p in pids.items() if _alive(p)}
        assert not survivors, f"outlived the killed stack (/proc/<pid>/stat): {survivors}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        for pid in pids.values():  # whatever outlived the check, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
