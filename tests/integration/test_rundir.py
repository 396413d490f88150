"""Run directories: one run per directory (the lock), unique names within a second, resume=auto restarts a run
stopped before its first checkpoint, and the mistakes of `resume` cost nothing."""

from __future__ import annotations

import sys

import pytest
import yaml

from latentdiff import rundir
from latentdiff.errors import NothingToDo
from latentdiff.train import run_training

from ..conftest import TINY_RUN, compose_config
from ..entries import one_line_error, snapshot


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

    from ..entries import entry

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

    from ..entries import entry

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

    from ..entries import entry

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


def test_an_error_of_an_entry_without_a_run_directory_removes_nothing(tmp_path, monkeypatch, capfd):
    """sample, evaluate, export and extract write no Hydra record: their errors leave the current directory as
    it is (an empty train.log there belongs to someone else)."""
    (tmp_path / "train.log").write_text("")
    before = snapshot(tmp_path)
    line, code = one_line_error(
        "evaluate", [f"samples={tmp_path}/missing.npz", "metrics=[isc]"], tmp_path, monkeypatch, capfd
    )
    assert code == 2 and "missing.npz" in line and snapshot(tmp_path) == before
