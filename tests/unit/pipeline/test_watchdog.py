"""The watchdog: once the driver is gone, what it started goes too, even if the driver was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypose.pipeline import watchdog

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="the watchdog reads /proc (Linux)")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_killed_driver_takes_its_process_tree_with_it(tmp_path):
    # A stand-in driver that starts a long-lived child in a session of its own (as Ray's agents are),
    # then the watchdog on itself, then waits.
    pid_file = tmp_path / "child"
    driver = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
from raypose.pipeline import watchdog
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pid_file)!r}, "w").write(str(child.pid))
watchdog.start(__import__("os").getpid())
time.sleep(120)
"""])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert child in watchdog.descendants(driver.pid)
    time.sleep(1.5)  # the watchdog has seen the tree
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
