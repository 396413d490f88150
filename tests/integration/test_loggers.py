"""Loggers: CSV always; TensorBoard; wandb offline without credentials and never prompting."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from latentdiff.train import run_training

from ..conftest import TINY_RUN


@pytest.mark.slow
def test_csv_tensorboard_and_offline_wandb_in_one_run(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_cfg([*TINY_RUN, "logger=all", "callbacks.sample_grid.every_n_steps=3"])
    run = Path(run_training(cfg)["run_dir"])
    assert (run / "metrics.csv").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_csv_history(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_cfg([*TINY_RUN, "logger=wandb"])
    run = Path(run_training(cfg)["run_dir"])
    run_id = torch.load(run / "last.ckpt", weights_only=True)["latentdiff"]["wandb_id"]
    (first,) = (run / "wandb").glob("offline-run-*")
    assert first.name.endswith(run_id)
    again = compose_cfg([*TINY_RUN, "logger=wandb", f"resume={run}", "trainer.max_steps=5"])
    assert run_training(again)["global_step"] == 5
    assert torch.load(run / "last.ckpt", weights_only=True)["latentdiff"]["wandb_id"] == run_id
    assert all(r.name.endswith(run_id) for r in (run / "wandb").glob("offline-run-*"))  # the same wandb run
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4]  # the history before the resume is kept, nothing twice
