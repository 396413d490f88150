"""Run directories: one run per directory (the lock), unique names within a second, resume=auto restarts a run
stopped before its first checkpoint, and the mistakes of `resume` cost nothing."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from latentdiff import runlock
from latentdiff.errors import ConfigError
from latentdiff.runlock import LOCK, RunLock

from ..conftest import ROOT, TINY_RUN
from ..helpers.cli import run_python
from ..helpers.rundir import write_lock


def test_a_live_holder_on_this_host_keeps_the_lock(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=other.pid, process_start=runlock._process_start(other.pid))
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {other.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    RunLock(tmp_path).acquire().release()  # the holder died (kill -9): its lock is stale, taken over


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
    write_lock(tmp_path / "run", pid=2**22 + 7)
    assert _race(tmp_path / "run") == ["refused", "refused", "refused", "won"]


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


def test_the_command_line_refuses_a_second_run_in_one_line(tmp_path):
    """The lock as a user meets it: a second train.py into a directory another live run holds."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "busy", pid=holder.pid, process_start=runlock._process_start(holder.pid))
        (tmp_path / "busy" / "train.log").write_text("")  # the live run's log, empty so far: it stays
        proc = run_python(tmp_path, [str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}/busy", *TINY_RUN])
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: paths.output_dir={tmp_path}/busy is in use by another run (pid {holder.pid}")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [LOCK, "train.log"]  # nothing written or removed
