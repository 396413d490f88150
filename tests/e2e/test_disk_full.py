"""A full disk costs nothing: the checkpoint that does not fit is one line naming the file and the space it
needs, the previous checkpoint and metrics.csv stay as they were, no temporary file is left, and a resume on a
full disk changes nothing.

The disk is a small tmpfs where the test may mount one (root on Linux; LATENTDIFF_TEST_TMPFS=0 forces the
other way); elsewhere every file opened for writing under it is patched to raise ENOSPC once the "disk" budget
is spent, which is what the kernel does."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess

import pytest
import torch

from latentdiff.checkpoint import verify_checkpoint

from ..conftest import TINY_RUN
from ..entries import one_line_error, snapshot

RUN = [
    *TINY_RUN,
    "trainer.max_steps=5",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.keep_last=-1",
]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(folder, fill): a folder on a device with room for one checkpoint of the tiny run; `fill()` takes the rest."""
    folder = tmp_path / "disk"
    folder.mkdir()
    size_mb = 48
    mounted = (
        os.environ.get("LATENTDIFF_TEST_TMPFS", "1") == "1"
        and os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    budget = {"left": size_mb * 2**20}
    if not mounted:  # a patched writer: every byte written under `folder` is counted against the budget
        real_open = builtins.open

        class Counted:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                if len(data) > budget["left"]:
                    raise OSError(errno.ENOSPC, "No space left on device", self.f.name)
                budget["left"] -= len(data)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        def counted_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            inside = str(file).startswith(str(folder))
            return Counted(f) if inside and any(c in mode for c in "wa") else f

        monkeypatch.setattr(builtins, "open", counted_open)
        real_usage = shutil.disk_usage

        def usage(path):
            left = budget["left"]
            return shutil._ntuple_diskusage(left, 0, left) if str(path).startswith(str(folder)) else real_usage(path)

        monkeypatch.setattr(shutil, "disk_usage", usage)

    def fill() -> None:
        if mounted:
            with open(folder / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 2**16)
                        f.flush()
                except OSError:  # full
                    pass
        else:
            budget["left"] = 0

    yield folder, fill
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_checkpoint_that_does_not_fit_is_one_line_and_keeps_the_previous_one(
    small_disk, tmp_path, monkeypatch, capfd
):
    disk, fill = small_disk
    args = [f"hydra.run.dir={disk}/run", *RUN]
    line, code = one_line_error("train", args, tmp_path, monkeypatch, capfd)
    run = disk / "run"
    assert code == 4, line
    assert line.startswith(f"error: no space left on the device writing {run}/step_0000004.ckpt (it needs about "), line
    assert "MB are free" in line and "the run's checkpoints (last.ckpt, step_0000002.ckpt) are intact" in line, line
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # no temporary file left
    assert torch.load(run / "step_0000002.ckpt", weights_only=True)["global_step"] == 2
    assert verify_checkpoint(run / "last.ckpt") > 0 and (run / "metrics.csv").is_file()

    fill()  # the disk is full now: a resume must fail in one line and change nothing
    before = snapshot(disk)
    metrics = (run / "metrics.csv").read_bytes()
    line, code = one_line_error("train", [f"hydra.run.dir={run}", f"resume={run}", *RUN], tmp_path, monkeypatch, capfd)
    assert code == 4 and line.startswith(f"error: no space left on the device of hydra.run.dir={run}"), line
    assert (run / "metrics.csv").read_bytes() == metrics and snapshot(disk) == before
