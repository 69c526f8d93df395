"""The lease: one writer per output at a time.

A run takes the output's lease before it writes anything and holds it to its end; a second run
into the same output refuses at once, naming the holder. Leases are numbered files under
`_lease/`, each created only if it does not exist yet (an atomic exclusive create: a hard link
on local disk, a conditional put `If-None-Match: *` on S3), so of two runs that race for the
same number exactly one wins:

    _lease/00000001.json   {"job_id", "host", "pid", "started_at", "heartbeat_at", "released"}

The highest number is the lease. Its holder rewrites it (a heartbeat) every HEARTBEAT_SECONDS;
the next run may take it (by creating the next number) when it was released, when its holder
is a process of this machine that no longer runs, when its heartbeat is older than
EXPIRY_SECONDS (a run killed on another machine), or when told to (`--break-lease`). A holder
whose lease was taken over finds the higher number at its next heartbeat or commit, and stops.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from raypose.errors import LeaseHeld, SpecError
from raypose.output.resume import iso_time

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
HEARTBEAT_SECONDS = 30.0
# Long enough that a heartbeat delayed by storage retries (botocore waits up to 20 s a try) never
# lets a second run in beside a live one; short enough that a killed scheduled run is retried soon.
EXPIRY_SECONDS = 300.0
# The job id a lease holds until the plan names the run (the job id comes from the output's metadata,
# which is read under the lease).
PLANNING = "(planning)"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    number: int
    job_id: str
    host: str
    pid: int
    process_start: str | None
    started_at: float
    heartbeat_at: float
    released: bool
    token: str

    @classmethod
    def parse(cls, number: int, data: dict[str, Any]) -> Holder:
        return cls(number=number, job_id=str(data.get("job_id")), host=str(data.get("host")),
                   pid=int(data.get("pid") or 0), process_start=data.get("process_start"),
                   started_at=float(data.get("started_at") or 0), heartbeat_at=float(data.get("heartbeat_at") or 0),
                   released=bool(data.get("released")), token=str(data.get("token")))

    def stale_because(self, now: float) -> str | None:
        """Why the next run may take this lease without being told to, or None while its holder may still run."""
        if self.released:
            return "released"
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.process_start):
            return f"its process {self.pid} on this machine is gone"
        if now - self.heartbeat_at > EXPIRY_SECONDS:
            return f"no heartbeat for {now - self.heartbeat_at:.0f} s"
        return None

    def describe(self, now: float) -> str:
        who = "a run still planning its job" if self.job_id == PLANNING else f"job {self.job_id}"
        return (f"{who} (pid {self.pid} on {self.host}) since {iso_time(self.started_at)}, "
                f"last heartbeat {now - self.heartbeat_at:.0f} s ago")


class Lease:
    """This run's hold on an output: `acquire`, `check` before each commit, `release` at the end."""

    def __init__(self, fs, root: str, job_id: str, output_url: str):
        self.fs, self.root, self.job_id, self.output_url = fs, root, job_id, output_url
        self.number: int | None = None
        self.started_at = time.time()
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    def acquire(self, break_lease: bool = False) -> Lease:
        """Take the lease, or raise LeaseHeld naming the run that holds it; then keep it alive in a thread.

        A store that cannot be read or written (no such bucket, no permission) is the output's SpecError,
        as the plan's own checks of the output path word it.
        """
        current = self.current()
        try:
            return self._acquire(current, break_lease)
        except (LeaseHeld, SpecError):
            raise
        except Exception as exc:
            raise SpecError(f"output.path: cannot write to {self.output_url}: {type(exc).__name__}: {exc}") from exc

    def _acquire(self, current: Holder | None, break_lease: bool) -> Lease:
        for attempt in range(5):  # another run may take the next number between our look and our create
            current = current if attempt == 0 else self.holder()
            if current is not None and not break_lease:
                why = current.stale_because(time.time())
                if why is None:
                    raise LeaseHeld(
                        f"output.path: {self.output_url} is being written by {current.describe(time.time())}; "
                        f"one run writes an output at a time: wait for it, or if it is gone for good, "
                        f"rerun with --break-lease (it expires {EXPIRY_SECONDS:.0f} s after its last heartbeat)")
                log.info("taking over the lease of %s (%s)", self.output_url, why)
            elif current is not None:
                log.warning("breaking the lease of %s held by %s", self.output_url, current.describe(time.time()))
            number = max(self._numbers(), default=0) + 1
            if create_exclusive(self.fs, self._path(number), self._record(released=False)):
                self.number = number
                self._remove_older()
                self._thread = threading.Thread(target=self._beat, name="raypose-lease", daemon=True)
                self._thread.start()
                return self
        raise LeaseHeld(f"output.path: {self.output_url}: other runs keep taking its lease; try again")

    def name(self, job_id: str) -> None:
        """Record the run's job id in the lease once the plan knows it."""
        self.job_id = job_id
        if self.number is not None:
            self._write(released=False)

    def current(self) -> Holder | None:
        """`holder()`, with a store that cannot be read (no such bucket, no permission) as the output's SpecError."""
        try:
            return self.holder()
        except Exception as exc:
            raise SpecError(f"output.path: cannot access {self.output_url}: {type(exc).__name__}: {exc}") from exc

    def holder(self) -> Holder | None:
        """The current lease: the highest-numbered file under `_lease/`, or None."""
        numbers = self._numbers()
        for number in reversed(numbers):  # a file half-written by a killed create is skipped
            try:
                return Holder.parse(number, json.loads(self.fs.cat_file(self._path(number))))
            except (FileNotFoundError, ValueError, TypeError, AttributeError):
                continue
        return None

    def check(self) -> None:
        """Raise LeaseHeld if another run took the lease over (called before each commit)."""
        if self.lost is None and self.number is not None and max(self._numbers(), default=0) > self.number:
            self.lost = "another run took the lease over"
        if self.lost is not None:
            taker = self.holder()
            raise LeaseHeld(f"output.path: {self.output_url}: this run lost its lease ({self.lost}"
                            f"{': ' + taker.describe(time.time()) if taker and taker.number != self.number else ''}); "
                            "it stopped before writing more; the shards it committed are kept")

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (the next run takes it without waiting)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS)
        if self.number is not None and self.lost is None:
            try:
                if max(self._numbers(), default=0) == self.number:
                    self._write(released=True)
            except Exception as exc:  # the run's outcome stands; a stale lease expires or is taken by pid
                log.warning("could not release the lease of %s: %s", self.output_url, exc)
        self.number = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if max(self._numbers(), default=0) > (self.number or 0):
                    self.lost = "another run took the lease over"
                    return
                self._write(released=False)
            except Exception as exc:  # storage hiccup: the next beat tries again, well within the expiry
                log.warning("lease heartbeat on %s failed: %s", self.output_url, exc)

    def _write(self, released: bool) -> None:
        with self._write_lock:
            with self.fs.open(self._path(self.number), "wb") as f:
                f.write(self._record(released))

    def _record(self, released: bool) -> bytes:
        return json.dumps({
            "job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "started_at": self.started_at,
            "heartbeat_at": time.time(), "released": released, "token": self.token,
        }, indent=2).encode()

    def _numbers(self) -> list[int]:
        folder = posixpath.join(self.root, LEASE_DIR)
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(folder, detail=False, refresh=True)]
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _remove_older(self) -> None:
        for number in self._numbers():
            if number < (self.number or 0):
                try:
                    self.fs.rm(self._path(number))
                except FileNotFoundError:
                    pass

    def _path(self, number: int) -> str:
        return posixpath.join(self.root, LEASE_DIR, f"{number:08d}.json")


_MEMORY_LOCK = threading.Lock()


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist; False if it does. Atomic where the store allows:
    a hard link on local disk, a conditional put on S3; on other stores a check, then a write."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    parent = posixpath.dirname(path)
    if protocols & {"file", "local"}:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if `path` exists: the content is whole when it appears
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if protocols & {"s3", "s3a"}:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    with _MEMORY_LOCK:  # memory:// and stores without a conditional write
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_start is None or _process_start(pid) in (None, process_start)
