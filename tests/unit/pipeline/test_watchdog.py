"""The watchdog: once the driver is gone, what it started goes too, even if the driver was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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


def test_a_killed_driver_takes_its_process_tree_with_it():
    # A stand-in driver that starts a long-lived child in a session of its own (as Ray's agents are),
    # says its pid, then waits; the watchdog follows it from a thread of this process.
    driver = subprocess.Popen([sys.executable, "-c", """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    child = int(driver.stdout.readline())
    seen = threading.Event()
    watcher = threading.Thread(target=watchdog.watch, args=(driver.pid, 0.01),
                               kwargs={"on_poll": lambda tree: child in tree and seen.set()})
    watcher.start()
    try:
        assert seen.wait(30), "the watchdog never saw the driver's child"
        assert child in watchdog.descendants(driver.pid)
        driver.kill()
        driver.wait()
        watcher.join(30)
        assert not watcher.is_alive()
        # SIGKILL is sent by the time watch() returns; the kernel ends the process a moment later.
        deadline, pause = time.monotonic() + 10, threading.Event()
        while alive(child) and time.monotonic() < deadline:
            pause.wait(0.01)
        assert not alive(child)
    finally:
        driver.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)
