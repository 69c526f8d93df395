"""The lease: one writer per output, taken atomically, kept alive, taken over only from a run that is gone."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import fsspec
import pytest

from raypose.output import lease as lease_module
from raypose.output.lease import PLANNING, Lease, LeaseHeld, create_exclusive


def lease_on(root, job_id="job-a"):
    return Lease(fsspec.filesystem("file"), str(root), job_id=job_id, output_url=str(root))


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with lease_on(tmp_path, "job-a").acquire():
        with pytest.raises(LeaseHeld, match=r"being written by job job-a \(pid \d+ on .*\) since .*--break-lease"):
            lease_on(tmp_path, "job-b").acquire()
    assert json.loads((tmp_path / "_lease" / "00000001.json").read_text())["released"] is True


def test_a_holder_still_planning_is_named_as_such_until_it_names_its_job(tmp_path):
    holder = lease_on(tmp_path, PLANNING).acquire()
    with pytest.raises(LeaseHeld, match=r"being written by a run still planning its job \(pid \d+"):
        lease_on(tmp_path, "job-b").acquire()
    holder.name("job-a")
    with pytest.raises(LeaseHeld, match=r"being written by job job-a \("):
        lease_on(tmp_path, "job-b").acquire()
    holder.release()


def test_a_released_lease_is_taken_by_the_next_run(tmp_path):
    lease_on(tmp_path, "job-a").acquire().release()
    second = lease_on(tmp_path, "job-b").acquire()
    assert second.number == 2 and sorted(p.name for p in (tmp_path / "_lease").iterdir()) == ["00000002.json"]
    second.release()


def test_the_lease_of_a_killed_process_on_this_machine_is_taken_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fsspec, sys, time; from raypose.output.lease import Lease; "
        f"Lease(fsspec.filesystem('file'), {str(tmp_path)!r}, 'job-killed', 'out').acquire(); "
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match="job-killed"):
            lease_on(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    taken = lease_on(tmp_path, "job-next").acquire()
    assert taken.number == 2
    taken.release()


def test_an_expired_heartbeat_from_another_machine_lets_the_next_run_in(tmp_path):
    (tmp_path / "_lease").mkdir()
    old = time.time() - lease_module.EXPIRY_SECONDS - 5
    (tmp_path / "_lease" / "00000007.json").write_text(json.dumps(
        {"job_id": "job-far", "host": "another-machine", "pid": 1, "started_at": old, "heartbeat_at": old}))
    taken = lease_on(tmp_path).acquire()
    assert taken.number == 8
    taken.release()


def test_breaking_a_live_lease_stops_its_holder_at_its_next_commit(tmp_path):
    first = lease_on(tmp_path, "job-a").acquire()
    second = lease_on(tmp_path, "job-b").acquire(break_lease=True)
    with pytest.raises(LeaseHeld, match="lost its lease.*job job-b"):
        first.check()
    second.check()  # the new holder goes on
    first.release()  # does not mark the taker's lease released
    assert json.loads((tmp_path / "_lease" / "00000002.json").read_text())["released"] is False
    second.release()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_SECONDS", 0.05)
    held = lease_on(tmp_path).acquire()
    first = json.loads((tmp_path / "_lease" / "00000001.json").read_text())["heartbeat_at"]
    deadline = time.time() + 5
    while json.loads((tmp_path / "_lease" / "00000001.json").read_text())["heartbeat_at"] == first:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.02)
    held.release()


def _race(path, start, results):
    start.wait()
    results.put(create_exclusive(fsspec.filesystem("file"), path, b"x"))


@pytest.mark.parametrize("attempt", range(3))
def test_of_processes_racing_to_create_a_lease_exactly_one_wins(tmp_path, attempt):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    path = str(tmp_path / "_lease" / "00000001.json")
    racers = [context.Process(target=_race, args=(path, start, results)) for _ in range(6)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(10)
    assert sorted(results.get(timeout=5) for _ in racers) == [False] * 5 + [True]


def test_leases_on_memory_and_s3_stores(s3_server):
    from helpers import s3_bucket

    memory = fsspec.filesystem("memory")
    assert create_exclusive(memory, "/lease-test/a.json", b"1") and not create_exclusive(memory, "/lease-test/a.json", b"2")
    options = s3_bucket(s3_server, "lease-bucket")
    s3 = fsspec.filesystem("s3", **options)
    assert create_exclusive(s3, "lease-bucket/out/_lease/00000001.json", b"1")
    assert not create_exclusive(s3, "lease-bucket/out/_lease/00000001.json", b"2")
    assert s3.cat_file("lease-bucket/out/_lease/00000001.json") == b"1"
    held = Lease(s3, "lease-bucket/out", "job-s3", "s3://lease-bucket/out").acquire()
    assert held.number == 2
    with pytest.raises(LeaseHeld, match="job-s3"):
        Lease(s3, "lease-bucket/out", "job-other", "s3://lease-bucket/out").acquire()
    held.release()
