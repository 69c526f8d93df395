"""Fault injection, for testing that jobs survive dying workers: off unless RAYPOSE_FAULT is set.

RAYPOSE_FAULT=STAGE:ACTION:N makes the N-th call of STAGE in a worker process fail, once:
ACTION `exit` kills the worker process (as an OOM kill or a lost node would), `raise`
raises. With RAYPOSE_FAULT_MARKER=PATH the fault fires only in the first process to create
PATH, so a retried task or a restarted actor runs clean. ACTION `sleep` instead slows every
call by N tenths of a second (to interrupt a job mid-run).
"""

from __future__ import annotations

import os
import time
from collections import Counter

FAULT = "RAYPOSE_FAULT"
MARKER = "RAYPOSE_FAULT_MARKER"
_calls: Counter[str] = Counter()


def inject(stage: str) -> None:
    """Fail here if RAYPOSE_FAULT names this stage and call."""
    spec = os.environ.get(FAULT)
    if not spec:
        return
    target, action, nth = spec.split(":")
    if target != stage:
        return
    if action == "sleep":
        time.sleep(int(nth) / 10)
        return
    _calls[stage] += 1
    if _calls[stage] != int(nth):
        return
    marker = os.environ.get(MARKER)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    if action == "exit":
        os._exit(17)
    raise RuntimeError(f"fault injected in {stage} (RAYPOSE_FAULT={spec})")


def fault_env() -> dict[str, str]:
    """The driver's fault settings, to hand to the workers' runtime environment."""
    return {name: os.environ[name] for name in (FAULT, MARKER) if name in os.environ}
