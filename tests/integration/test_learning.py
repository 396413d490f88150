"""The quickstart learns: held-out loss at fixed noise levels falls well below its start."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from latentdiff.train import build_module, run_training


@pytest.mark.parametrize(
    "objective", [[], ["diffusion=cosine_v", "sampler=dpm_solver"]], ids=["flow (the quickstart's)", "v-prediction"]
)
def test_quickstart_loss_falls_on_held_out_noise_levels(compose_cfg, objective):
    # the quickstart experiment as it is (and on a Gaussian objective), shortened to 150 steps of batch 32
    cfg = compose_cfg(
        [
            *objective,
            "trainer.max_steps=150",
            "trainer.val_check_interval=75",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "data.batch_size=32",
            "data.num_train=4000",
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.progress_bar=null",
            "optim.warmup_steps=15",
        ]
    )
    # the same held-out loss (same images, noise, timesteps) for the untrained model
    torch.manual_seed(cfg.seed)
    untrained = build_module(cfg).eval()
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batches = [b for b, _ in zip(datamodule.val_dataloader(), range(2))]
    start = sum(untrained.heldout_loss(untrained.backbone, b, i).item() for i, b in enumerate(batches)) / 2

    run = Path(run_training(cfg)["run_dir"])
    with open(run / "metrics.csv") as f:
        val = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    print(f"held-out loss: {start:.4f} untrained, {val[0]:.4f} and {val[1]:.4f} after 75 and 150 steps")
    assert len(val) == 2
    assert val[-1] < 0.5 * start, (start, val)
    assert val[-1] < val[0]
