"""Reliability: a run killed anywhere and resumed ends bit-for-bit where the uninterrupted run ends; SIGTERM /
SIGUSR1 checkpoint and exit 0; NaN steps are skipped or stop the run; checkpoints are atomic and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentdiff.checkpoint import load_checkpoint
from latentdiff.errors import ConfigError
from latentdiff.rundir import latest_checkpoint
from latentdiff.train import AtomicCheckpointIO


def test_atomic_checkpoint_write_leaves_the_old_file_on_a_crash(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}, "latentdiff": {}}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}, "latentdiff": {}}, path)
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_truncated_or_foreign_checkpoint_is_a_one_line_error(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(1000)}, "latentdiff": {}}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"ckpt_path=.*truncated.ckpt is not a readable checkpoint \(truncated"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(ConfigError, match="is not a latentdiff training checkpoint"):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "latentdiff": Path("x")}, pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(ConfigError, match="pickled.ckpt was refused: it holds pickled objects"):
        load_checkpoint(pickled)


def test_latest_checkpoint_is_the_highest_step_not_the_newest_file(tmp_path):
    for name, step in (("step_0000008.ckpt", 8), ("last.ckpt", 12), ("step_0000004.ckpt", 4)):
        torch.save({"global_step": step, "state_dict": {}, "latentdiff": {}}, tmp_path / name)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    assert latest_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"truncated")  # a damaged last.ckpt: fall back to the newest step
    assert latest_checkpoint(tmp_path).name == "step_0000008.ckpt"
