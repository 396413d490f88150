"""Data parallelism on CPU (gloo): DDP over 2 processes computes the 1-process gradient of the whole batch;
a 2-process run launched by `train.py trainer=ddp` trains, writes its run directory once and resumes exactly;
the global batch splits over ranks or fails in one line; the Hydra child command of ranks > 0."""

from __future__ import annotations

import sys

import pytest

from latentdiff.distributed import per_rank_batch
from latentdiff.errors import ConfigError

from ..conftest import ROOT


def test_per_rank_batch_splits_the_global_batch_or_says_what_divides():
    assert per_rank_batch(1024, 8) == 128
    assert per_rank_batch(1024, 8, accumulate=4) == 32
    with pytest.raises(ConfigError, match=r"data.batch_size=100 .* 8 process.*use a multiple of 8, e.g. 96 or 104"):
        per_rank_batch(100, 8)


def test_rank_child_command_runs_this_job_not_the_sweep(monkeypatch, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from latentdiff import strategies

    hydra_cfg = OmegaConf.create(
        {
            "overrides": {"task": ["model.depth=9", "trainer=ddp"]},
            "runtime": {"output_dir": str(tmp_path / "multirun_x" / "3"), "cwd": str(tmp_path)},
            "job": {"name": "train"},
        }
    )
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr("hydra.utils.get_original_cwd", lambda: str(tmp_path))
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # `python train.py`, not `python -m`
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py"), "-m", "model.depth=9,13,17", "trainer=ddp"])
    command, cwd = strategies.hydra_child_command(1)
    assert cwd == str(tmp_path)
    assert "-m" not in command and "model.depth=9,13,17" not in command
    assert command[2:4] == ["model.depth=9", "trainer=ddp"]
    assert f"hydra.run.dir='{tmp_path / 'multirun_x' / '3'}'" in command and "hydra.output_subdir=null" in command
