"""Run directories: one run per directory (the lock), unique names within a second, resume=auto restarts a run
stopped before its first checkpoint, and the mistakes of `resume` cost nothing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from latentdiff import rundir, runlock
from latentdiff.errors import ConfigError, NothingToDo
from latentdiff.rundir import run_dir
from latentdiff.runlock import LOCK, RunLock
from latentdiff.train import run_training

from .conftest import ROOT, TINY_RUN, compose_config
from .entries import one_line_error, snapshot
from .helpers.rundir import _write_lock
from .test_cli import _run


def test_the_lock_is_held_while_the_run_lives_and_removed_after(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"paths.output_dir={tmp_path}/run is in use by another run \(pid"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK).exists()


def test_a_live_holder_on_this_host_keeps_the_lock(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, pid=other.pid, process_start=runlock._process_start(other.pid))
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {other.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    RunLock(tmp_path).acquire().release()  # the holder died (kill -9): its lock is stale, taken over


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
    _write_lock(tmp_path, age_s, **fields)
    if stale:
        RunLock(tmp_path).acquire().release()
    else:
        with pytest.raises(ConfigError, match="is in use by another run"):
            RunLock(tmp_path).acquire()


def test_a_requeued_slurm_job_takes_over_its_earlier_start(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node-a", pid=1, slurm_job="42", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path).acquire().release()


def _claim(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        lock = RunLock(folder).acquire()
        results.put("won")
        time.sleep(1.0)
        lock.release()
    except ConfigError:
        results.put("refused")


def _race(folder: Path, n: int = 4) -> list[str]:
    """`n` processes claim `folder` at once: their sorted outcomes."""
    ctx = mp.get_context("fork")  # the children need nothing new: no re-import (spawn costs a minute here)
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(folder), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return sorted(results.get(timeout=5) for _ in procs)


def test_two_processes_claiming_at_once_one_wins(tmp_path):
    assert _race(tmp_path / "run") == ["refused", "refused", "refused", "won"]


def test_processes_taking_over_one_stale_lock_one_wins(tmp_path):
    """Four runs find the same stale lock (its process is gone): exactly one takes it over."""
    _write_lock(tmp_path / "run", pid=2**22 + 7)
    assert _race(tmp_path / "run") == ["refused", "refused", "refused", "won"]


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


@pytest.mark.slow
def test_two_runs_into_one_directory_one_is_refused(tmp_path):
    """Two train.py processes started together into the same hydra.run.dir (different seeds): one runs, the other
    is refused in one line, and the directory holds one run (its config, its checkpoints)."""
    common = [str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}/shared", *TINY_RUN, "trainer.max_steps=20"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LATENTDIFF_DEBUG", None)
    procs = [
        subprocess.Popen(
            [sys.executable, *common, f"seed={s}"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
        )
        for s in (1, 2)
    ]
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    winner = next(i for i, (code, _) in enumerate(outs) if code == 0)
    refused = [line for line in outs[1 - winner][1].splitlines() if line.strip()]
    assert (
        len(refused) == 1
        and refused[0].startswith("error: paths.output_dir=")
        and ("is in use by another run" in refused[0] or "already holds a run" in refused[0])
    ), refused
    config = yaml.safe_load((tmp_path / "shared" / "config.yaml").read_text())
    assert config["seed"] == winner + 1 and not (tmp_path / "shared" / LOCK).exists()


def test_resume_auto_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path, monkeypatch, capfd):
    base = tmp_path / "outputs" / "orphaned"
    orphan = base / "2026-01-01_00-00-00"
    orphan.mkdir(parents=True)
    (orphan / "config.yaml").write_text("seed: 0\n")  # what a run killed before its first checkpoint leaves
    (orphan / "metrics.csv").write_text("step,train/loss\n")  # its header: no step was logged
    args = [f"paths.log_dir={tmp_path}/outputs", "name=orphaned", "resume=auto", *TINY_RUN]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    from hydra.core.global_hydra import GlobalHydra

    from .entries import entry

    GlobalHydra.instance().clear()
    entry("train")()
    assert [p.name for p in base.iterdir()] == [orphan.name]  # no new directory, no orphan left
    out, err = capfd.readouterr()
    assert (orphan / "last.ckpt").is_file() and "was stopped before its first checkpoint; restarting it" in out + err
    assert yaml.safe_load((orphan / "config.yaml").read_text())["name"] == "orphaned"  # this run's config


def test_resume_auto_leaves_a_run_that_trained_without_a_checkpoint(tmp_path, monkeypatch):
    """A run killed between checkpoints (or run with callbacks.checkpoint=null) cannot be continued: resume=auto
    starts a new run and leaves its config, metrics and grids as they are."""
    base = tmp_path / "outputs" / "trained"
    old = base / "2026-01-01_00-00-00"
    (old / "samples").mkdir(parents=True)
    (old / "config.yaml").write_text("seed: 7\n")
    (old / "metrics.csv").write_text("step,train/loss\n1,0.5\n2,0.4\n")
    (old / "samples" / "step_0000002.png").write_bytes(b"png")
    assert not rundir.stopped_before_first_checkpoint(old)
    before = snapshot(old)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["train.py", f"paths.log_dir={tmp_path}/outputs", "name=trained", "resume=auto", *TINY_RUN]
    )
    from hydra.core.global_hydra import GlobalHydra

    from .entries import entry

    GlobalHydra.instance().clear()
    entry("train")()
    new = [p for p in base.iterdir() if p != old]
    assert len(new) == 1 and (new[0] / "last.ckpt").is_file()
    assert snapshot(old) == before


def test_resume_auto_of_a_finished_run_says_so_and_changes_nothing(tmp_path, monkeypatch, capfd):
    cfg = compose_config(TINY_RUN, tmp_path)
    run_training(cfg)
    with pytest.raises(NothingToDo, match=r"is finished: its checkpoint is at step 3 and trainer.max_steps=3"):
        run_training(compose_config([*TINY_RUN, f"resume={tmp_path}/run"], tmp_path))
    before = snapshot(tmp_path)
    from hydra.core.global_hydra import GlobalHydra

    from .entries import entry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["train.py", f"paths.log_dir={tmp_path}/outputs", *TINY_RUN, f"resume={tmp_path}/run"]
    )
    GlobalHydra.instance().clear()
    capfd.readouterr()
    entry("train")()  # exit status 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"resume={tmp_path}/run: {tmp_path}/run is finished"), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resume={t}/nowhere"], "resume={t}/nowhere does not exist; use resume=auto"),
        (["resume={t}/notes.txt"], "resume={t}/notes.txt is a file; resume takes a run directory"),
        (["ckpt_path={t}"], "ckpt_path={t} is a folder; ckpt_path takes a checkpoint file"),
        (["paths.log_dir={t}/notes.txt"], "paths.log_dir={t}/notes.txt is not a folder; runs are written into folders"),
        (
            ["paths.log_dir={t}/notes.txt/sub"],
            "paths.log_dir={t}/notes.txt/sub is not a folder ({t}/notes.txt is a file)",
        ),
        (["hydra.run.dir={t}/notes.txt"], "hydra.run.dir={t}/notes.txt is not a folder"),
    ],
)
def test_paths_of_the_wrong_kind_create_nothing(tmp_path, monkeypatch, capfd, args, message):
    (tmp_path / "notes.txt").write_text("a user's file\n")
    before = snapshot(tmp_path)
    args = [a.format(t=tmp_path) for a in args]
    full = ([] if any(a.startswith("paths.log_dir") for a in args) else [f"paths.log_dir={tmp_path}/outputs"]) + args
    line, code = one_line_error("train", [*full, *TINY_RUN], tmp_path, monkeypatch, capfd)
    assert line.startswith("error: " + message.format(t=tmp_path)), line
    assert code == 2 and snapshot(tmp_path) == before


def test_the_command_line_refuses_a_second_run_in_one_line(tmp_path):
    """The lock as a user meets it: a second train.py into a directory another live run holds."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(tmp_path / "busy", pid=holder.pid, process_start=runlock._process_start(holder.pid))
        (tmp_path / "busy" / "train.log").write_text("")  # the live run's log, empty so far: it stays
        proc = _run(tmp_path, [str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}/busy", *TINY_RUN])
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: paths.output_dir={tmp_path}/busy is in use by another run (pid {holder.pid}")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [LOCK, "train.log"]  # nothing written or removed


def test_an_error_of_an_entry_without_a_run_directory_removes_nothing(tmp_path, monkeypatch, capfd):
    """sample, evaluate, export and extract write no Hydra record: their errors leave the current directory as
    it is (an empty train.log there belongs to someone else)."""
    (tmp_path / "train.log").write_text("")
    before = snapshot(tmp_path)
    line, code = one_line_error(
        "evaluate", [f"samples={tmp_path}/missing.npz", "metrics=[isc]"], tmp_path, monkeypatch, capfd
    )
    assert code == 2 and "missing.npz" in line and snapshot(tmp_path) == before


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
