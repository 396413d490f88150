"""Experiment presets (`conf/experiment/*.yaml`).

- The paper rows carry the official U-ViT hyper-parameters: `GOLDEN` holds them, copied from the official
  repository's `configs/*.py` (github.com/baofff/U-ViT), so a preset that drifts from its row fails here.
- Every preset (found by glob, so a new file is covered) trains one step on CPU at toy width, on a tiny store
  made by the real extraction code (a tiny VAE for latent rows, `vae=none` for pixel rows, a tiny CLIP for
  COCO), each store built once per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from latentdiff.models.build import build_backbone

from ..conftest import CONF_DIR
from ..helpers.experiments import DDPM, DPM_SINGLESTEP, EXPERIMENTS, PIXELS, SD_VAE, UNET, UNET_COND, UVIT
from ..resolved_configs import resolved


@dataclass(frozen=True)
class Row:
    """Golden values of one preset. Official keys: train.batch_size (global), optimizer.lr / betas /
    weight_decay, lr_scheduler.warmup_steps, train.n_steps, dataset.p_uncond, nnet.*, sample.sample_steps,
    sample.scale (w = 1 + scale; 1 without CFG)."""

    official: str  # configs/<file> of the official repository
    batch: int
    lr: float
    betas: tuple[float, float]
    warmup: int
    steps: int
    p_uncond: float
    model: dict  # composed model keys (U-ViT: nnet.*; UNets: the matched-compute sizing)
    params: int  # backbone parameters
    sampler: tuple[str, str | None, int, float]  # (scheduler target, DPM-Solver algorithm, steps, guidance w)
    schedule: str  # diffusion beta_schedule: linear (the official VP SDE, discretised) | scaled_linear (SD)
    vae: tuple[str, float]  # (autoencoder target, latent scaling factor)
    image_size: int
    weight_decay: float = 0.03
    ema: float = 0.9999  # config.get('ema_rate', 0.9999) in every official train*.py
    extra: dict = field(default_factory=dict)  # other composed keys


def _uvit(embed_dim, depth, num_heads, patch_size, num_classes, img_size, in_chans, **kw):
    return {
        "_target_": UVIT,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "patch_size": patch_size,
        "num_classes": num_classes,
        "img_size": img_size,
        "in_chans": in_chans,
        "mlp_ratio": 4,
        "qkv_bias": False,
        "mlp_time_embed": False,
        **kw,
    }


S, M, L, H = (512, 12, 8), (768, 16, 12), (1024, 20, 16), (1152, 28, 16)  # (embed_dim, depth, num_heads)
PIXEL = (PIXELS, 1.0)
SD = (SD_VAE, 0.18215)
COCO_SD = (SD_VAE, 0.23010)  # autoencoder.scale_factor of configs/mscoco_uvit_small.py
DPM_PP_50 = (DPM_SINGLESTEP, "dpmsolver++", 50)  # dpm_solver_pp.py (predict_x0), order 3: *_discrete.py
DPM_50 = (DPM_SINGLESTEP, "dpmsolver", 50)  # dpm_solver_pytorch.py (noise prediction), order 3: eval.py, eval_ldm.py

GOLDEN: dict[str, Row] = {
    "cifar10_uvit_s2": Row(
        "cifar10_uvit_small.py", 128, 2e-4, (0.99, 0.999), 2500, 500_000, 0.0,
        _uvit(*S, 2, -1, 32, 3, conv=True, use_checkpoint=False), 44_255_328,
        (DDPM, None, 1000, 1.0), "linear", PIXEL, 32, extra={"module.num_classes": 0},
    ),
    "celeba64_uvit_s4": Row(
        "celeba64_uvit_small.py", 128, 2e-4, (0.99, 0.99), 5000, 500_000, 0.0,
        _uvit(*S, 4, -1, 64, 3, conv=True, use_checkpoint=False), 44_292_228,
        (DDPM, None, 1000, 1.0), "linear", PIXEL, 64, extra={"module.num_classes": 0},
    ),
    "imagenet64_uvit_m4": Row(
        "imagenet64_uvit_mid.py", 1024, 3e-4, (0.99, 0.99), 5000, 300_000, 0.0,
        _uvit(*M, 4, 1001, 64, 3, conv=True, use_checkpoint=True), 130_941_060,
        (*DPM_50, 1.0), "linear", PIXEL, 64, extra={"module.num_classes": 1000},
    ),
    "imagenet64_uvit_l4": Row(
        "imagenet64_uvit_large.py", 1024, 3e-4, (0.99, 0.99), 5000, 300_000, 0.0,
        _uvit(*L, 4, 1001, 64, 3, conv=True, use_checkpoint=True), 286_828_676,
        (*DPM_50, 1.0), "linear", PIXEL, 64, extra={"module.num_classes": 1000},
    ),
    "imagenet256_uvit_l2": Row(
        "imagenet256_uvit_large.py", 1024, 2e-4, (0.99, 0.99), 5000, 300_000, 0.15,
        _uvit(*L, 2, 1001, 32, 4, conv=True, use_checkpoint=True), 286_763_172,
        (*DPM_50, 1.4), "linear", SD, 256,
    ),
    "imagenet256_uvit_h2": Row(
        "imagenet256_uvit_huge.py", 1024, 2e-4, (0.99, 0.99), 5000, 500_000, 0.1,
        _uvit(*H, 2, 1001, 32, 4, conv=False, use_checkpoint=True), 500_832_016,
        (*DPM_PP_50, 1.4), "scaled_linear", SD, 256,
    ),
    "imagenet512_uvit_l4": Row(
        "imagenet512_uvit_large.py", 1024, 2e-4, (0.99, 0.99), 5000, 500_000, 0.15,
        _uvit(*L, 4, 1001, 64, 4, conv=True, use_checkpoint=True), 286_861_524,
        (*DPM_50, 1.7), "linear", SD, 512,
    ),
    "imagenet512_uvit_h4": Row(
        "imagenet512_uvit_huge.py", 1024, 2e-4, (0.99, 0.99), 5000, 500_000, 0.1,
        _uvit(*H, 4, 1001, 64, 4, conv=False, use_checkpoint=True), 500_942_656,
        (*DPM_PP_50, 1.7), "scaled_linear", SD, 512,
    ),
    "mscoco_uvit_s2": Row(
        "mscoco_uvit_small.py", 256, 2e-4, (0.9, 0.9), 5000, 1_000_000, 0.1,
        _uvit(*S, 2, -1, 32, 4, clip_dim=768, num_clip_token=77, conv=True, use_checkpoint=False), 44_692_644,
        (*DPM_PP_50, 2.0), "scaled_linear", COCO_SD, 256, extra={"data.random_flip": False},
    ),
    "mscoco_uvit_s2_deep": Row(  # the official README: mscoco_uvit_small.py --config.nnet.depth=16
        "mscoco_uvit_small.py", 256, 2e-4, (0.9, 0.9), 5000, 1_000_000, 0.1,
        _uvit(512, 16, 8, 2, -1, 32, 4, clip_dim=768, num_clip_token=77, conv=True), 58_345_636,
        (*DPM_PP_50, 2.0), "scaled_linear", COCO_SD, 256, extra={"data.random_flip": False},
    ),
    # baselines: the recipe of the U-ViT row they match (same official file), a UNet of about its forward MACs
    "imagenet256_unet": Row(
        "imagenet256_uvit_large.py", 1024, 2e-4, (0.99, 0.99), 5000, 300_000, 0.15,
        {"_target_": UNET, "block_out_channels": [384, 768, 1280], "num_class_embeds": 1001, "sample_size": 32},
        470_536_836, (*DPM_50, 1.4), "linear", SD, 256,
    ),
    "mscoco_unet": Row(
        "mscoco_uvit_small.py", 256, 2e-4, (0.9, 0.9), 5000, 1_000_000, 0.1,
        {"_target_": UNET_COND, "block_out_channels": [128, 256, 512, 512], "cross_attention_dim": 768},
        142_236_036, (*DPM_PP_50, 2.0), "scaled_linear", COCO_SD, 256, extra={"data.random_flip": False},
    ),
}  # fmt: skip


def test_presets_are_named_after_their_files_and_paper_rows_have_golden_values():
    assert set(GOLDEN) <= set(EXPERIMENTS), sorted(set(GOLDEN) - set(EXPERIMENTS))
    for name in EXPERIMENTS:
        header = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert resolved("train", [f"experiment={name}"]).name == name
        if "mirrors the official" in header:
            assert name in GOLDEN, f"{name} mirrors an official config: add its golden values to GOLDEN"
        if name in GOLDEN:
            assert f"configs/{GOLDEN[name].official}" in header, f"{name}: the header names its official file"


def test_paper_rows_have_the_official_values():
    for name, row in sorted(GOLDEN.items()):
        try:
            _check_paper_row(row, resolved("train", [f"experiment={name}"]))
        except AssertionError as err:
            raise AssertionError(f"experiment={name}: {err}") from err


def _check_paper_row(row: Row, cfg) -> None:
    assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == (row.batch, 1)  # the global batch
    assert cfg.optim.lr == pytest.approx(row.lr) and cfg.optim.weight_decay == pytest.approx(row.weight_decay)
    assert tuple(cfg.optim.betas) == pytest.approx(row.betas)
    assert (cfg.optim.warmup_steps, cfg.trainer.max_steps) == (row.warmup, row.steps)
    assert cfg.module.p_uncond == pytest.approx(row.p_uncond)
    assert cfg.module.ema.decay == pytest.approx(row.ema) and cfg.module.ema.warmup is False
    assert cfg.trainer.gradient_clip_val == 0 and cfg.seed == 1234  # no official clipping; config.seed
    assert cfg.trainer.accelerator == "gpu" and cfg.data.image_size == row.image_size
    for key, value in row.extra.items():
        assert OmegaConf.select(cfg, key) == value, key
    # the model: official nnet keys (U-ViT) or the matched-compute sizing (UNets), after interpolation
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert {k: model[k] for k in row.model} == row.model
    with torch.device("meta"):
        assert sum(p.numel() for p in build_backbone(cfg.model).parameters()) == row.params
    # the objective: epsilon prediction on 1000 steps of the row's schedule
    scheduler = cfg.diffusion.scheduler
    assert (scheduler.beta_schedule, scheduler.prediction_type, scheduler.num_train_timesteps) == (
        row.schedule,
        "epsilon",
        1000,
    )
    assert cfg.diffusion.loss_weighting == "none"
    target, algorithm, steps, guidance = row.sampler
    assert cfg.sampler.scheduler._target_ == target and cfg.sampler.scheduler.get("algorithm_type") == algorithm
    assert (cfg.sampler.steps, cfg.sampler.guidance_scale) == (steps, pytest.approx(guidance))
    if algorithm is not None:
        assert cfg.sampler.scheduler.solver_order == 3
    vae = OmegaConf.to_container(cfg.vae, resolve=True)
    assert vae["_target_"] == row.vae[0]
    if row.vae[0] == SD_VAE:  # null: the VAE's own config, 0.18215 for the SD VAEs
        assert (vae["scaling_factor"] or 0.18215) == pytest.approx(row.vae[1])
        assert vae["pretrained"] == "stabilityai/sd-vae-ft-ema"
    else:
        assert vae["scaling_factor"] == row.vae[1]
    # the optimizer and LR schedule built from the config: AdamW with these values, linear warm-up, then flat
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], *group["betas"], group["weight_decay"]) == pytest.approx(
        (row.lr, *row.betas, row.weight_decay)
    )
    factor = instantiate(cfg.optim.lr_scheduler)(optimizer).lr_lambdas[0]
    assert [factor(0), factor(row.warmup // 2), factor(row.warmup), factor(row.steps)] == pytest.approx(
        [0.0, 0.5, 1.0, 1.0], abs=1e-3
    )
