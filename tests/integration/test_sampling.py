"""sample.py and the FID callback: per-index determinism, resume, sharding, objectives end to end, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff.samplers.conditions import class_labels
from latentdiff.samplers.image import module_sampler
from latentdiff.train import build_module, run_training

from ..artefacts import make_inception_weights
from ..conftest import TINY_RUN
from ..helpers.sampling import sampling_module


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver"])
def test_an_index_gives_the_same_image_whatever_the_batch(compose_cfg, sampler):
    module = sampling_module(compose_cfg, f"sampler={sampler}")
    cfg = compose_cfg([*TINY_RUN, f"sampler={sampler}"])
    from hydra.utils import instantiate

    sampler_ = module_sampler(module, instantiate(cfg.sampler.scheduler), 4, guidance_scale=2.0, seed=7)
    labels = class_labels(range(6), 4, seed=7)
    whole = sampler_.images(list(range(6)), labels)  # (6, 32, 32, 3) uint8
    order = [4, 1, 5]
    part = sampler_.images(order, labels[order])
    again = torch.cat([sampler_.images([0, 1], labels[:2]), sampler_.images([2, 3, 4, 5], labels[2:])])
    assert (whole[order].int() - part.int()).abs().max() <= 1  # float sums may round one level differently
    assert (whole.int() - again.int()).abs().max() <= 1
    other = module_sampler(module, instantiate(cfg.sampler.scheduler), 4, guidance_scale=2.0, seed=8)
    assert (whole.int() - other.images(list(range(6)), labels).int()).abs().float().mean() > 10  # seeds matter


@pytest.mark.parametrize(
    "overrides",
    [
        ["diffusion=linear"],
        ["diffusion=cosine_v"],
        ["diffusion=linear", "diffusion.scheduler.prediction_type=sample", "sampler=ddim"],
        ["diffusion=zero_snr", "sampler=ddim"],
        ["diffusion=flow", "sampler=flow_euler"],
        ["diffusion=flow", "diffusion.time_sampling=logit_normal", "sampler=flow_heun"],
    ],
    ids=["epsilon", "v", "x0", "zero-snr-v", "flow", "flow-logit-normal-heun"],
)
def test_each_objective_trains_and_samples(compose_cfg, overrides):
    cfg = compose_cfg([*TINY_RUN, *overrides, "trainer.max_steps=4", "sampler.steps=3"])
    result = run_training(cfg)
    assert np.isfinite(result["metrics"]["val/loss"])
    run = Path(result["run_dir"])
    assert (run / "samples" / "step_0000004.png").is_file()
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    module = build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.latent_shape = (3, 32, 32)
    from hydra.utils import instantiate

    images = module_sampler(module.eval(), instantiate(cfg.sampler.scheduler), 3).images([0, 1], torch.tensor([0, 1]))
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8 and images.float().std() > 0


def test_fid_callback_logs_and_keeps_the_best_checkpoint(compose_cfg, tmp_path):
    from latentdiff.data import render_shapes

    weights = make_inception_weights(tmp_path / "inception.pth")
    images, _ = render_shapes(16, seed=3)
    np.savez(tmp_path / "ref.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    cfg = compose_cfg(
        [
            *TINY_RUN,
            "trainer.max_steps=4",
            "callbacks=fid",
            "callbacks.progress_bar=null",
            "callbacks.sample_grid.every_n_steps=0",
            f"callbacks.fid.reference={tmp_path / 'ref.npz'}",
            "callbacks.fid.num_samples=6",
            "callbacks.fid.every_n_steps=2",
            "callbacks.fid.batch_size=3",
            f"callbacks.fid.inception_weights={weights}",
            f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
        ]
    )
    result = run_training(cfg)
    run = Path(result["run_dir"])
    rows = [r for r in _csv(run / "metrics.csv") if r.get("val/fid_6")]
    assert [int(r["step"]) for r in rows] == [2, 4], rows
    values = [float(r["val/fid_6"]) for r in rows]
    assert all(np.isfinite(values)) and min(values) > 0
    best = torch.load(run / "best_fid.ckpt", weights_only=True)
    assert best["global_step"] in (2, 4)
    state = next(v for k, v in best["callbacks"].items() if k.startswith("FID"))
    assert state["best"] == pytest.approx(min(values), rel=1e-6)
    assert result["metrics"]["val/fid_6"] == pytest.approx(values[-1], rel=1e-6)


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_refuses_a_sampler_that_cannot_follow_the_objective_before_it_starts(compose_cfg):
    from latentdiff.errors import ConfigError

    for overrides, message in (
        (["diffusion=zero_snr", "sampler=heun"], "HeunDiscreteScheduler cannot follow the zero-terminal-SNR schedule"),
        (["sampler.guidance_interval=[800,100]"], r"sampler.guidance_interval=\[800, 100\] must be \[low, high\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            run_training(compose_cfg([*TINY_RUN, *overrides]))
