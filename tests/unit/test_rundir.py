"""Run directories: one run per directory (the lock), unique names within a second, resume=auto restarts a run
stopped before its first checkpoint, and the mistakes of `resume` cost nothing."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from latentdiff import rundir, runlock
from latentdiff.errors import ConfigError
from latentdiff.rundir import run_dir
from latentdiff.runlock import LOCK, RunLock

from ..helpers.rundir import write_lock


def test_the_lock_is_held_while_the_run_lives_and_removed_after(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"paths.output_dir={tmp_path}/run is in use by another run \(pid"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK).exists()


@pytest.mark.parametrize(
    ("fields", "age_s", "stale"),
    [
        ({"pid": 2**22 + 7}, 0, True),  # no such process on this host
        ({"pid": os.getpid(), "process_start": "1"}, 0, True),  # the pid was reused by another program
        ({"host": "elsewhere", "pid": 1}, 10, False),  # another host, fresh heartbeat
        ({"host": "elsewhere", "pid": 1}, runlock.STALE_AFTER_S + 60, True),  # another host, no heartbeat
    ],
)
def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path, fields, age_s, stale):
    write_lock(tmp_path, age_s, **fields)
    if stale:
        RunLock(tmp_path).acquire().release()
    else:
        with pytest.raises(ConfigError, match="is in use by another run"):
            RunLock(tmp_path).acquire()


def test_a_requeued_slurm_job_takes_over_its_earlier_start(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node-a", pid=1, slurm_job="42", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path).acquire().release()


def test_a_lock_being_written_is_not_taken(tmp_path):
    (tmp_path / LOCK).write_text("")  # created, its record not written yet
    with pytest.raises(ConfigError, match=r"in use by another run \(a run that is starting\)"):
        RunLock(tmp_path).acquire()
    os.utime(tmp_path / LOCK, (time.time() - 60, time.time() - 60))  # a process killed mid-write
    RunLock(tmp_path).acquire().release()
    assert not (tmp_path / LOCK).exists()


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    class Frozen:
        @staticmethod
        def now():
            import datetime as dt

            return dt.datetime(2026, 12, 1, 20, 41, 28)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    first, second = run_dir(str(tmp_path / "x"), None), run_dir(str(tmp_path / "x"), None)
    assert Path(first).name == "2026-12-01_20-41-28" and Path(second).name == "2026-12-01_20-41-28_1"
    assert Path(first).is_dir() and Path(second).is_dir()


def test_after_an_error_a_new_run_directory_is_removed_unless_it_trained(tmp_path):
    """The clean-up after an error removes a run directory this process made before any work; one whose run logged
    steps (a disk that filled up mid-run) keeps its metrics and grids."""
    untrained = Path(run_dir(str(tmp_path / "x"), None))
    (untrained / "config.yaml").write_text("seed: 0\n")
    (untrained / "metrics.csv").write_text("step,train/loss\n")
    rundir.remove_new_run_dir(untrained)
    assert not untrained.exists()
    trained = Path(run_dir(str(tmp_path / "x"), None))
    (trained / "metrics.csv").write_text("step,train/loss\n1,0.5\n")
    rundir.remove_new_run_dir(trained)
    assert (trained / "metrics.csv").is_file()
